"""Personalisation on the client: each client ends with a model that fits its own data.

``[personalization] method`` (the fit and evaluation tasks carry it, with its settings, as
config entries) names one of:

* ``"finetune"``: the personal model is the global model fine-tuned for ``personal_epochs``
  epochs on the client's training data (only the tensors whose names start with
  ``finetune_layers``' prefixes, or all), when it is evaluated. Training in the rounds is plain.
* ``"ditto"`` (Li et al., ICML 2021): the client trains the global model as usual (its update is
  aggregated as usual) and, beside it, its personal model ``v`` on the objective
  ``loss(v) + lambda/2 ||v - w_global||^2`` for ``personal_epochs`` epochs.
* ``"fedrep"`` (Collins et al., ICML 2021): the model is split into a body and a head (the
  tensors whose names start with ``personal_head``'s prefixes; default the last layer). The
  client trains its own head for ``personal_epochs`` epochs with the body frozen, then the body
  for ``epochs`` with the head frozen.
* ``"fedper"`` (Arivazhagan et al. 2019): body and head trained together for ``epochs``.

Under FedRep and FedPer the head never leaves the client: the reply's update is zero at every
head position (the client's head is not in it), and the server aggregates only the body
(:mod:`fedguard.protocol.shared_part`). The personal model lives in the client's own state
(``task.state[STATE]``, one flat vector; for FedRep and FedPer only its head positions are
used), which the simulator saves in its checkpoints and a deployed client keeps on disk, with
the round it was trained in and the one it was trained from, so that a round answered twice
trains from the same model (:func:`_start`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedguard.algorithms import personalization
from fedguard.client import training
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer, TrainResult, TrainTask
from fedguard.client.trainers import for_task as builtin_for_task
from fedguard.client.trainers import local_training_from
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import features, messages

METHOD = features.PERSONALIZATION  # the config entry that names the method
EPOCHS = "personal_epochs"  # fine-tuning / Ditto's personal / FedRep's head epochs
LAMBDA = "personal_lambda"  # Ditto's lambda
HEAD = "personal_head"  # FedRep / FedPer: the head's name prefixes, comma-separated
LAYERS = "finetune_layers"  # fine-tuning: the tuned tensors' name prefixes, comma-separated
STATE = "personal"  # the client state entry that holds the personal model [D]
ROUND = "personal_round"  # [1] int64: the round whose training made STATE
BEFORE = "personal_before"  # STATE as it was before that round's training (absent: none)


class Method(enum.StrEnum):
    """The personalisation methods by their configuration names."""

    NONE = "none"
    FINETUNE = "finetune"
    DITTO = "ditto"
    FEDREP = "fedrep"
    FEDPER = "fedper"


BODY_ONLY = frozenset({Method.FEDREP, Method.FEDPER})  # the head stays on the client


def _prefixes(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class PersonalSettings:
    """A personalisation method and its settings (see the module docstring)."""

    method: Method
    epochs: int = 1
    ditto_lambda: float = 0.1
    head: tuple[str, ...] = ()  # empty: the model's last layer
    finetune_layers: tuple[str, ...] = ()  # empty: every tensor

    def config(self) -> dict[str, messages.Scalar]:
        """The task config entries that carry these settings."""
        return {
            METHOD: self.method.value,
            EPOCHS: self.epochs,
            LAMBDA: self.ditto_lambda,
            HEAD: ",".join(self.head),
            LAYERS: ",".join(self.finetune_layers),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, messages.Scalar]) -> PersonalSettings | None:
        """The settings a task's ``config`` carries (None: no personalisation)."""
        name = config.get(METHOD)
        if name is None or name == Method.NONE:
            return None
        try:
            method = Method(str(name))
        except ValueError:
            raise ValueError(f"Unknown personalisation method {name!r}.") from None
        return cls(
            method,
            epochs=messages.config_int(config, EPOCHS, 1),
            ditto_lambda=messages.config_float(config, LAMBDA, 0.1),
            head=_prefixes(str(config.get(HEAD, ""))),
            finetune_layers=_prefixes(str(config.get(LAYERS, ""))),
        )


def trainable_names(model: ModelAdapter) -> list[str]:
    """The names of ``model.trainable()``'s tensors, in that order (from the model's spec)."""
    by_offset = {t.offset: t.name for t in model.spec.tensors}
    return [by_offset[s.offset] for s in model.trainable()]


def head_prefixes(model: ModelAdapter, settings: PersonalSettings) -> tuple[str, ...]:
    """The head's name prefixes: the configured ones, else the model's last trainable layer."""
    if settings.head:
        return settings.head
    return (personalization.last_layer_prefix(trainable_names(model)),)


def head_mask(model: ModelAdapter, settings: PersonalSettings) -> torch.Tensor:
    """The ``[D]`` mask of ``model``'s head positions under ``settings``."""
    spec = model.spec.tensors
    return personalization.name_mask(
        [t.name for t in spec], [t.numel for t in spec], head_prefixes(model, settings)
    )


def _flags(model: ModelAdapter, prefixes: Sequence[str], *, inside: bool) -> list[bool]:
    """Per trainable tensor: whether its name starts with one of ``prefixes`` (``inside``) or
    starts with none of them (not ``inside``)."""
    return [any(n.startswith(p) for p in prefixes) == inside for n in trainable_names(model)]


def check_split(model: ModelAdapter, settings: PersonalSettings) -> None:
    """Refuse settings that name no tensor of ``model`` (ValueError with the names it has): a
    head must hold some but not all trainable tensors, fine-tuned layers at least one."""
    names = trainable_names(model)
    if settings.method in BODY_ONLY:
        prefixes = head_prefixes(model, settings)
        inside = _flags(model, prefixes, inside=True)
        if not any(inside) or all(inside):
            what = "no" if not any(inside) else "every"
            raise ValueError(
                f"personalization.head = {list(prefixes)} matches {what} trainable tensor of "
                f"the model; a head must be some of them but not all (the model's: {names})"
            )
    if settings.method is Method.FINETUNE and settings.finetune_layers:
        if not any(_flags(model, settings.finetune_layers, inside=True)):
            raise ValueError(
                f"personalization.finetune_layers = {list(settings.finetune_layers)} matches "
                f"no trainable tensor of the model (the model's: {names})"
            )


def _personal_training(
    config: Mapping[str, messages.Scalar], epochs: int
) -> training.LocalTraining:
    """``[client]``'s loop for ``epochs`` epochs without a proximal term or a step cap."""
    return replace(local_training_from(config), epochs=epochs, proximal_mu=0.0, max_steps=None)


def ditto_step(
    model: ModelAdapter,
    data: ClientData,
    start: torch.Tensor,
    global_params: torch.Tensor,
    cfg: training.LocalTraining,
    ditto_lambda: float,
    generator: torch.Generator,
) -> training.TrainStats:
    """Ditto's personal update: ``model`` from ``start`` (the personal model) trained on
    ``loss(v) + ditto_lambda/2 ||v - global_params||^2`` with ``cfg``'s optimizer."""
    model.set_flat(start)
    return training.train(
        model,
        data.train_x,
        data.train_y,
        replace(cfg, proximal_mu=ditto_lambda),
        generator=generator,
        global_params=global_params,
    )


class PersonalizedTrainer(ClientTrainer):
    """``inner`` (fedguard's loop or DP-SGD) with the personalisation the task names."""

    def __init__(self, inner: ClientTrainer) -> None:
        self.inner = inner
        self.features = inner.features | {features.PERSONALIZATION}

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        settings = PersonalSettings.from_config(task.config)
        if settings is None or settings.method is Method.FINETUNE:
            # fine-tuning happens when the personal model is evaluated; rounds train plainly
            return self.inner.train(model, data, task)
        if settings.method is Method.DITTO:
            result = self.inner.train(model, data, task)
            own = _start(task)
            ditto_step(
                model,
                data,
                task.params if own is None else own,
                task.params,
                _personal_training(task.config, settings.epochs),
                settings.ditto_lambda,
                task.generator,
            )
            _keep(task, own, model.get_flat())
            return result
        return self._body_and_head(model, data, task, settings)

    def _body_and_head(
        self, model: ModelAdapter, data: ClientData, task: TrainTask, settings: PersonalSettings
    ) -> TrainResult:
        """FedRep / FedPer: train from the global body with the client's own head; the reply's
        update holds the body's change only."""
        head = head_mask(model, settings)
        own = _start(task)
        start = task.params if own is None else personalization.combine(task.params, own, head)
        model.set_flat(start)
        own_task = replace(task, params=start)
        if settings.method is Method.FEDPER:
            result = self.inner.train(model, data, own_task)
        else:
            result = self._fedrep(model, data, own_task, settings)
        _keep(task, own, model.get_flat())
        return replace(result, update=personalization.body_only(result.update, head))

    @staticmethod
    def _fedrep(
        model: ModelAdapter, data: ClientData, task: TrainTask, settings: PersonalSettings
    ) -> TrainResult:
        """FedRep's two phases: the head with the body frozen, then the body with the head
        frozen; the update is the change from ``task.params``."""
        prefixes = head_prefixes(model, settings)
        body_cfg = local_training_from(task.config)  # [client]'s epochs, step cap, mu
        head_stats = training.train(
            model,
            data.train_x,
            data.train_y,
            _personal_training(task.config, settings.epochs),
            generator=task.generator,
            trained=_flags(model, prefixes, inside=True),
        )
        body_stats = training.train(
            model,
            data.train_x,
            data.train_y,
            body_cfg,
            generator=task.generator,
            global_params=task.params if body_cfg.proximal_mu > 0 else None,
            trained=_flags(model, prefixes, inside=False),
        )
        metrics = {
            "train_loss": body_stats.loss,
            "steps": float(body_stats.steps),
            "head_train_loss": head_stats.loss,
        }
        return TrainResult(model.get_flat() - task.params, body_stats.num_examples, metrics)


def _start(task: TrainTask) -> torch.Tensor | None:
    """The personal model ``task`` trains from (None: none yet, the global model is used).

    The client's current one, unless it has already trained in ``task.round``: a deployed
    client that restarts, or whose reply was lost, fetches its open task again, and training
    from the model that task already advanced would advance it twice for one round. It then
    trains from the model it had before that round, so a round answered twice leaves the same
    personal model (and, for FedRep and FedPer, sends the same update) as a round answered once.
    """
    trained = task.state.get(ROUND)
    if trained is not None and int(trained[0]) == task.round:
        return task.state.get(BEFORE)
    return task.state.get(STATE)


def _keep(task: TrainTask, start: torch.Tensor | None, trained: torch.Tensor) -> None:
    """Keep ``trained``, the personal model of ``task.round``, with the one it started from."""
    if start is None:
        task.state.pop(BEFORE, None)
    else:
        task.state[BEFORE] = start
    task.state[ROUND] = torch.tensor([task.round], dtype=torch.int64)
    task.state[STATE] = trained


def for_task(config: Mapping[str, messages.Scalar]) -> ClientTrainer:
    """The built-in trainer a fit task's ``config`` names
    (:func:`fedguard.client.trainers.for_task`), in the personalisation it names, if any (what
    a client without a configured trainer runs)."""
    base = builtin_for_task(config)
    if features.PERSONALIZATION in features.asked(config, {}):
        return PersonalizedTrainer(base)
    return base


def personal_params(
    model: ModelAdapter,
    data: ClientData,
    params: torch.Tensor,
    state: MutableMapping[str, torch.Tensor],
    config: Mapping[str, messages.Scalar],
    generator: torch.Generator,
) -> torch.Tensor:
    """The client's personal model ``[D]`` for the global ``params``: fine-tuned from them now
    (``finetune``), its Ditto model, or the global body with its own head (FedRep / FedPer).
    A client that has not trained yet has the global model as its own."""
    settings = PersonalSettings.from_config(config)
    if settings is None:
        return params
    if settings.method is Method.FINETUNE:
        model.set_flat(params)
        layers = settings.finetune_layers
        training.train(
            model,
            data.train_x,
            data.train_y,
            _personal_training(config, settings.epochs),
            generator=generator,
            trained=None if not layers else _flags(model, layers, inside=True),
        )
        return model.get_flat()
    own = state.get(STATE)
    if own is None:
        return params
    if settings.method is Method.DITTO:
        return own
    return personalization.combine(params, own, head_mask(model, settings))
