"""fedguard's local training loops as :class:`~fedguard.client.trainer.ClientTrainer` objects.

* :class:`OptimizerTrainer`: ``client.optimizer``'s loop (SGD, Adam, full-batch L-BFGS;
  :mod:`fedguard.client.training`), with FedProx's proximal term, SCAFFOLD's correction and
  control variate (:mod:`fedguard.algorithms.optimizers.scaffold`), FedDyn's dynamic regulariser
  and gradient state (:mod:`fedguard.algorithms.optimizers.feddyn`) and FedNova's normalised
  update (:mod:`fedguard.algorithms.optimizers.fednova`) when the task asks for them.
* :class:`DPSGDTrainer`: DP-SGD at the task's noise multiplier and clip
  (:mod:`fedguard.client.dp_sgd`); the reply reports what ran, for the server to compose.
* :class:`NewtonTrainer`: the gradient and Hessian sums of a convex model, and the client's own
  Newton step as its update.

:func:`for_task` picks the one a fit task's config names, which is what a client without a
configured trainer runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fedguard.algorithms.optimizers import committed, feddyn, fednova, newton, scaffold
from fedguard.client import dp_sgd, training
from fedguard.client.trainer import ClientTrainer, TrainResult, TrainTask
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import features, messages

if TYPE_CHECKING:
    from fedguard.client.data import ClientData


def local_training_from(config: Mapping[str, messages.Scalar]) -> training.LocalTraining:
    """The local training settings carried in a fit task's config. FedDyn's quadratic term
    ``alpha/2 ||w - w_global||^2`` is a proximal term, so its ``feddyn_alpha`` enters as
    ``proximal_mu`` (the strategies never send both)."""
    number, count = messages.config_float, messages.config_int
    return training.LocalTraining(
        optimizer=training.LocalOptimizer(str(config.get("optimizer", "sgd"))),
        lr=number(config, "lr", 0.01),
        momentum=number(config, "momentum", 0.0),
        weight_decay=number(config, "weight_decay", 0.0),
        epochs=count(config, "epochs", 1),
        batch_size=count(config, "batch_size", 32),
        proximal_mu=number(config, "proximal_mu", 0.0) + number(config, features.FEDDYN_ALPHA, 0.0),
        max_steps=None if config.get("max_steps") is None else count(config, "max_steps"),
        augment=str(config.get("augment", "none")),
    )


class OptimizerTrainer(ClientTrainer):
    """SGD, Adam or L-BFGS as the task's ``optimizer`` says, with FedProx's proximal term
    (``proximal_mu > 0``), SCAFFOLD's correction ``c - c_i`` (a ``control`` tensor), FedDyn's
    regulariser (``feddyn_alpha > 0``) and FedNova's normalisation (``fednova`` true)."""

    features = frozenset(
        {
            features.PROXIMAL_TERM,
            features.CONTROL_VARIATE,
            features.DYNAMIC_REGULARIZER,
            features.NORMALIZED_UPDATE,
        }
    )

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        cfg = local_training_from(task.config)
        stats = training.train(
            model,
            data.train_x,
            data.train_y,
            cfg,
            generator=task.generator,
            global_params=task.params if cfg.proximal_mu > 0 else None,
            correction=gradient_correction(task),
        )
        result, state = optimizer_result(task, model.get_flat() - task.params, stats)
        task.state.update(state)  # one write: a state kept on disk never holds half of it
        return result


def gradient_correction(task: TrainTask) -> torch.Tensor | None:
    """The fixed term added to every local gradient of ``task``: SCAFFOLD's ``c - c_i`` (with a
    server control variate), FedDyn's ``-g_k`` (with ``feddyn_alpha``), else None. A client
    without a control variate or gradient state yet starts from zero."""
    server_control = task.tensors.get(features.CONTROL)
    if server_control is not None:
        return scaffold.correction(server_control, _client_control(task, server_control)[0])
    if _feddyn_alpha(task) is not None:
        return feddyn.correction(_feddyn_gradient(task)[0])
    return None


def _feddyn_alpha(task: TrainTask) -> float | None:
    if features.DYNAMIC_REGULARIZER not in features.asked(task.config, task.tensors):
        return None
    return messages.config_float(task.config, features.FEDDYN_ALPHA)


def _feddyn_gradient(task: TrainTask) -> tuple[torch.Tensor, int]:
    """The client's ``g_k`` for ``task`` and the round whose aggregated update last moved it
    (see :func:`_settled`)."""
    return _settled(task, features.FEDDYN_STATE, like=task.params)


def _client_control(task: TrainTask, server_control: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The client's SCAFFOLD control variate ``c_i`` for ``task`` and the round whose aggregated
    control delta last moved it (see :func:`_settled`)."""
    return _settled(task, features.SCAFFOLD_STATE, like=server_control)


def _settled(
    task: TrainTask, names: features.CommittedState, *, like: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The state ``names`` of ``task``'s client for this round and the round whose aggregated
    update last moved it: its pending state committed if the task says that round's update was
    aggregated, else its committed one (zero before any). A state that is not the one the
    server's part holds is refused (ValueError; see
    :func:`~fedguard.algorithms.optimizers.committed.settle`)."""
    state = task.state
    rounds = state.get(names.rounds)
    committed_round, pending_round = (0, 0) if rounds is None else (int(rounds[0]), int(rounds[1]))
    try:
        return committed.settle(
            state.get(names.committed),
            committed_round,
            state.get(names.pending),
            pending_round,
            messages.config_int(task.config, names.told),
            like=like,
            server_part=names.server_part,
            client_part=names.client_part,
        )
    except ValueError as exc:
        raise ValueError(
            f"Client {task.client_id}, round {task.round}: {names.strategy}: {exc}"
        ) from None


def _trained(
    task: TrainTask,
    names: features.CommittedState,
    settled: tuple[torch.Tensor, int],
    new: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The state entries ``names`` after training on ``task`` from the ``settled`` state (and
    its round): that one committed, ``new`` pending with this round."""
    state, committed_round = settled
    return {
        names.committed: state,
        names.pending: new,
        names.rounds: torch.tensor([committed_round, task.round]),
    }


def optimizer_result(
    task: TrainTask, update: torch.Tensor, stats: training.TrainStats
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """The optimizer loop's result for ``task`` from its ``update`` and ``stats``, and the
    entries of the client's state it sets: SCAFFOLD's control variate (the new ``c_i``, whose
    change from the one the round started from the reply carries as ``control_delta``) and
    FedDyn's gradient state, each as the state the round started from, committed, and the new
    one pending until the server says this round's update was aggregated. Under FedNova the
    reply's update is the normalised ``delta / ||a_i||_1``, with ``||a_i||_1`` as its
    ``step_norm``. Shared by every engine that runs this loop."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    alpha = _feddyn_alpha(task)
    if alpha is not None:
        g = _feddyn_gradient(task)
        new_g = feddyn.client_gradient_update(g[0], update, alpha=alpha)
        state.update(_trained(task, features.FEDDYN_STATE, g, new_g))
    if features.NORMALIZED_UPDATE in features.asked(task.config, task.tensors):
        cfg = local_training_from(task.config)
        if cfg.optimizer is not training.LocalOptimizer.SGD:
            raise ValueError(
                f'FedNova normalises by the weights SGD gives its local gradients; optimizer "'
                f'{cfg.optimizer}" has none: use "sgd" (with or without momentum).'
            )
        norm = fednova.step_norm(stats.steps, cfg.momentum)
        update = fednova.normalise(update, norm)
        tensors[features.STEP_NORM] = torch.tensor([norm], dtype=torch.float32)
    server_control = task.tensors.get(features.CONTROL)
    if server_control is not None:
        control = _client_control(task, server_control)
        lr = local_training_from(task.config).lr
        new_control = scaffold.client_control_update(
            server_control, control[0], update, local_steps=stats.steps, lr=lr
        )
        tensors["control_delta"] = new_control - control[0]
        state.update(_trained(task, features.SCAFFOLD_STATE, control, new_control))
    metrics = {"train_loss": stats.loss, "steps": float(stats.steps)}
    return TrainResult(update, stats.num_examples, metrics, tensors), state


def dp_settings(config: Mapping[str, messages.Scalar]) -> dp_sgd.DPSGD:
    """The DP-SGD clip and noise multiplier a fit task's ``config`` carries."""
    return dp_sgd.DPSGD(
        max_grad_norm=messages.config_float(config, messages.DP_SGD_CLIP),
        noise_multiplier=messages.config_float(config, messages.DP_SGD_NOISE),
    )


def dp_result(update: torch.Tensor, stats: dp_sgd.DPTrainStats) -> TrainResult:
    """DP-SGD's result: the update and what ran (sampling rate, steps, noise, clip), which the
    server composes. Shared by every engine that runs DP-SGD."""
    metrics = {
        "train_loss": stats.loss,
        "steps": float(stats.steps),
        messages.DP_SGD_RAN_RATE: stats.sampling_rate,
        messages.DP_SGD_RAN_STEPS: float(stats.steps),
        messages.DP_SGD_RAN_NOISE: stats.noise_multiplier,
        messages.DP_SGD_RAN_CLIP: stats.max_grad_norm,
    }
    return TrainResult(update, stats.num_examples, metrics)


class DPSGDTrainer(ClientTrainer):
    """DP-SGD (Abadi et al. 2016) at the task's noise multiplier and per-example clip; the reply
    reports the sampling rate, steps, noise and clip that ran."""

    features = frozenset({features.DP_SGD})

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        return run_dp_sgd(model, data, task)


def run_dp_sgd(
    model: ModelAdapter,
    data: ClientData,
    task: TrainTask,
    *,
    gradient_canaries: torch.Tensor | None = None,
) -> TrainResult:
    """DP-SGD on ``task`` at its config's noise and clip, and its result (the update and what
    ran). ``gradient_canaries``: a privacy audit's white-box canaries that this client holds
    (see :func:`fedguard.client.dp_sgd.train`)."""
    stats = dp_sgd.train(
        model,
        data.train_x,
        data.train_y,
        local_training_from(task.config),
        dp_settings(task.config),
        generator=task.generator,
        gradient_canaries=gradient_canaries,
    )
    return dp_result(model.get_flat() - task.params, stats)


class NewtonTrainer(ClientTrainer):
    """The sums of the loss gradient and Hessian over the client's examples (the server pools
    them into the exact Newton step); the update is the client's own Newton step."""

    features = frozenset({features.NEWTON_STATISTICS})

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        cfg = local_training_from(task.config)
        stats = training.newton_statistics(
            model, data.train_x, data.train_y, weight_decay=cfg.weight_decay
        )
        local_step = newton.newton_direction(
            stats.gradient_sum, stats.hessian_sum, stats.num_examples, damping=1e-8
        )
        tensors = {
            "gradient_sum": stats.gradient_sum.to(torch.float32),
            "hessian_sum": stats.hessian_sum.to(torch.float32).reshape(-1),
        }
        metrics = {"train_loss": stats.loss, "steps": 1.0}
        return TrainResult(local_step, stats.num_examples, metrics, tensors)


def for_task(config: Mapping[str, messages.Scalar]) -> ClientTrainer:
    """The built-in trainer a fit task's ``config`` names: the Newton statistics for
    ``optimizer = "newton"``, DP-SGD when it carries DP-SGD's noise, else the optimizer loop."""
    if config.get("optimizer") == training.LocalOptimizer.NEWTON:
        return NewtonTrainer()
    if messages.DP_SGD_NOISE in config:
        return DPSGDTrainer()
    return OptimizerTrainer()
