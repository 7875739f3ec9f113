"""The pieces of an experiment built from its configuration: data, model, clients, transport,
attack, privacy, secure aggregation, strategy and round driver, plus the central evaluation.
The strategy, its aggregator, the clients' trainer and the attack are fedguard's or a user's
plug-ins, built the same way and held to the same composition rules before round 1.

One :class:`Experiment` serves the command line, ``fedguard.run``, the benchmarks and the
demo clients; the deployed server, which holds no data, assembles the same strategy, privacy
plan, secure aggregation and driver from its clients' registrations with the same functions
(:func:`build_strategy`, :func:`build_driver`, :func:`checked_secure_aggregation`; see
:mod:`fedguard.experiment.data_free`), so that a simulated run and a deployed one are
assembled the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from fedguard import plugins
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.algorithms.he import encryption as he_encryption
from fedguard.audit import canary
from fedguard.client import evaluation, personal
from fedguard.client.app import ClientApp, ClientPins, client_pins
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer
from fedguard.data import dataset
from fedguard.data.errors import DataError
from fedguard.experiment import (
    checkpoint,
    config_checks,
    engines,
    federation,
    personalization,
    privacy,
    ray_runtime,
)
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.plugin_context import PluginContext
from fedguard.models import registry as models
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import fedopt, he, messages, secagg
from fedguard.protocol.aggregator import Aggregator
from fedguard.protocol.async_driver import AsyncDriver, AsyncSettings
from fedguard.protocol.central_dp import CentralPrivacy
from fedguard.protocol.driver import FederatedEvaluation, RoundDriver
from fedguard.protocol.strategy import CentralDP, Strategy, StrategyKind, StrategyState
from fedguard.protocol.transport import Transport
from fedguard.simulation import attack
from fedguard.simulation.latency import Base, LatencyModel

# Builds the transport over the federation's client ids (default: the in-process simulator).
TransportFn = Callable[[list[int]], Transport]


def _auc(probabilities: torch.Tensor, y: torch.Tensor) -> float | None:
    """ROC AUC of the predicted probabilities (one-vs-rest above two classes); None where it is
    undefined: fewer than two classes present, or a model whose outputs are not finite (a
    diverged or poisoned model must be reported as such, not end the run)."""
    from sklearn.metrics import roc_auc_score

    labels = y.numpy()
    present = np.unique(labels)
    if len(present) < 2:
        return None
    p = probabilities.double().numpy()
    if not np.isfinite(p).all():
        return None
    if p.shape[1] == 2:
        return float(roc_auc_score(labels, p[:, 1]))
    if len(present) < p.shape[1]:
        return None
    p = p / p.sum(axis=1, keepdims=True)
    return float(roc_auc_score(labels, p, multi_class="ovr"))


def central_metrics(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Accuracy, loss and ROC AUC of the global model on the central evaluation set."""
    result, probabilities = evaluation.evaluate_with_probabilities(
        model, x, y, batch_size=batch_size
    )
    return {
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "test_auc": _auc(probabilities, y),
    }


def negative_loss(
    model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, cfg: ExperimentConfig
) -> Callable[[torch.Tensor], float]:
    """``params -> -(mean loss of the model with params on x, y)``: contribution scores'
    utility (larger is better)."""

    def utility(params: torch.Tensor) -> float:
        model.set_flat(params)
        return -evaluation.evaluate(model, x, y, batch_size=cfg.evaluation.batch_size).loss

    return utility


def federated_metrics(fed: FederatedEvaluation | None, prefix: str) -> dict[str, Any]:
    """The clients' added-up evaluation as ``{prefix}_accuracy``, ``_loss`` and ``_auc`` (all
    None when no client answered)."""
    if fed is None:
        return {f"{prefix}_accuracy": None, f"{prefix}_loss": None, f"{prefix}_auc": None}
    return {
        f"{prefix}_accuracy": fed.accuracy,
        f"{prefix}_loss": fed.loss,
        f"{prefix}_auc": fed.auc,
    }


def federated_report(fed: FederatedEvaluation | None) -> dict[str, Any]:
    """The final report from the clients' confusion matrices, added up ({} without one):
    whole counts unless a client's weight was cut to its registered size."""
    if fed is None or fed.confusion is None:
        return {}
    matrix = fed.confusion
    whole = bool(torch.equal(matrix, matrix.round()))
    rows = matrix.round().long().tolist() if whole else matrix.tolist()
    return {"confusion_matrix": rows, "confusion_source": "federated"}


def confusion_report(
    model, x: torch.Tensor, y: torch.Tensor, groups: list[str] | None, batch_size: int
) -> dict[str, Any]:
    """Confusion matrix of ``model`` on ``x``, ``y`` and, where ``groups`` names the owner of
    each example, the accuracy per owner."""
    _, probabilities = evaluation.evaluate_with_probabilities(model, x, y, batch_size=batch_size)
    predicted = probabilities.argmax(dim=1).numpy()
    truth = y.numpy()
    k = probabilities.shape[1]
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    report: dict[str, Any] = {"confusion_matrix": matrix.tolist()}
    if groups is not None:
        owners = np.asarray(groups)
        report["accuracy_by_group"] = {
            str(g): float((predicted[owners == g] == truth[owners == g]).mean())
            for g in sorted(set(groups))
        }
    return report


def model_io(cfg: ExperimentConfig) -> tuple[tuple[int, ...], int]:
    """One example's shape and the class count, from the config alone (a server without the
    data set builds its model from these): ``model.input_shape`` and ``model.num_classes``,
    or for the synthetic data set its ``synthetic_shape`` and ``synthetic_classes``."""
    m, d = cfg.model, cfg.data
    shape, classes = m.input_shape, m.num_classes
    if d.dataset == "synthetic":
        shape = shape or tuple(d.synthetic_shape)
        classes = classes or d.synthetic_classes
    if shape is None or classes is None:
        missing = [k for k, v in (("input_shape", shape), ("num_classes", classes)) if v is None]
        raise ConfigError(
            f"{' and '.join(f'model.{k}' for k in missing)}: a server without the data set "
            "builds its model from the config; set them (e.g. input_shape = [1, 28, 28] and "
            "num_classes = 2 for PneumoniaMNIST)"
        )
    return tuple(int(v) for v in shape), int(classes)


def check_model_io(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse ``model.input_shape`` / ``model.num_classes`` that the loaded data contradicts."""
    m = cfg.model
    if m.input_shape is not None and tuple(m.input_shape) != input_shape:
        raise ConfigError(
            f"model.input_shape = {list(m.input_shape)} but the data's examples have shape "
            f"{list(input_shape)}"
        )
    if m.num_classes is not None and m.num_classes != num_classes:
        raise ConfigError(f"model.num_classes = {m.num_classes} but the data has {num_classes}")


def server_data(
    cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The evaluation set the server owns (``evaluation.server_data``: ``x``, ``y``), checked
    against the model's input shape and classes; None when the config names none."""
    path = cfg.evaluation.server_data
    if path is None:
        return None
    try:
        test, _ = dataset.read_client_npz(path, num_classes=num_classes)
    except DataError as exc:
        raise ConfigError(f"evaluation.server_data: {exc}") from None
    if tuple(test.x.shape[1:]) != input_shape:
        raise ConfigError(
            f"evaluation.server_data: examples of shape {list(test.x.shape[1:])}, the model "
            f"takes {list(input_shape)}"
        )
    x = torch.from_numpy(np.ascontiguousarray(test.x, dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(test.y, dtype=np.int64))


def check_output_width(model, example: torch.Tensor, num_classes: int, what: str) -> None:
    """Run ``model`` once on one ``example`` (a batch of one): it must give ``num_classes``
    outputs, or a one-line :class:`ConfigError` naming ``what`` says what it gave instead.

    A model whose width differs from the data's classes would otherwise train every round and
    fail only in the final report.
    """
    model.train_mode(False)
    try:
        with torch.no_grad():
            out = model.forward(example, training=False)
    except Exception as exc:  # a user's model may raise anything on a wrong input
        message = " ".join(str(exc).split())
        raise ConfigError(
            f"{what}: the model fails on one example of shape {tuple(example.shape[1:])} "
            f"({type(exc).__name__}: {message})"
        ) from None
    shape = tuple(getattr(out, "shape", ()))
    if shape != (1, num_classes):
        width = shape[-1] if shape else "no"
        raise ConfigError(
            f"{what}: the model gives {width} outputs per example (shape {shape} for one "
            f"example) but the data has {num_classes} classes"
        )


def _loaded(
    spec: str, *, what: str, kind: type, options: Mapping[str, Any], context: Any
) -> object:
    """The plug-in ``spec`` made with its ``options``, a ``kind`` (else a :class:`ConfigError`)."""
    try:
        made = plugins.load(spec, what=what, options=options, context=context)
        plugins.check_kind(made, kind, spec=spec, what=what)
    except plugins.PluginError as exc:
        raise ConfigError(str(exc)) from None
    return made


def build_trainer(cfg: ExperimentConfig, context: PluginContext) -> ClientTrainer:
    """``client.trainer``: a plug-in, or the built-in loop of ``[client]`` and ``[privacy]``."""
    c = cfg.client
    if plugins.is_reference(c.trainer):
        made = _loaded(
            c.trainer,
            what="client.trainer",
            kind=ClientTrainer,
            options=c.trainer_options,
            context=context,
        )
        return cast(ClientTrainer, made)  # _loaded checked its kind
    return config_checks.builtin_trainer(cfg)


def build_aggregator(cfg: ExperimentConfig, context: PluginContext) -> Aggregator:
    """``server.aggregator``: a plug-in, the weighted mean or a built-in robust rule."""
    s = cfg.server
    if plugins.is_reference(s.aggregator):
        made = _loaded(
            s.aggregator,
            what="server.aggregator",
            kind=Aggregator,
            options=s.aggregator_options,
            context=context,
        )
        return cast(Aggregator, made)  # _loaded checked its kind
    return config_checks.builtin_aggregator(s, cfg.experiment.seed)


def min_clients(cfg: ExperimentConfig, rule: Aggregator) -> int:
    """The fewest usable replies a round needs: ``min_clients``, and under a robust rule the
    updates it needs to tolerate ``byzantine_f`` (fewer fail the round as too few replies do)."""
    f = cfg.server.byzantine_f
    if cfg.server.aggregator == "mean" or f is None:
        return cfg.min_clients
    # asynchronous rounds: the rule runs on each buffer
    most = cfg.buffer_size if cfg.server.mode == "async" else cfg.clients_per_round
    return max(cfg.min_clients, config_checks.min_updates(rule, f, most))


def secure_aggregation_settings(
    cfg: ExperimentConfig, plan: privacy.PrivacyPlan | None, rule: Aggregator, *, max_weight: int
) -> secagg.Settings | he.Settings | None:
    """The ``[secure_aggregation]`` settings (None: off) under the privacy ``plan`` and the
    aggregator ``rule``, a client's integer weight capped at ``max_weight``; the fixed-point
    range is not checked here. ``mode = "ckks"``: the settings of aggregation under
    homomorphic encryption (:class:`fedguard.protocol.he.Settings`)."""
    a = cfg.secure_aggregation
    if not a.enabled:
        return None
    distributed = plan.distributed if plan is not None else None
    user_dp = plan is not None and plan.mode in ("central", "distributed")
    clip = cfg.privacy.clip_norm if user_dp else a.clip_norm
    if clip is None:  # the config refuses this
        where = "privacy.clip_norm" if user_dp else "secure_aggregation.clip_norm"
        raise ConfigError(f"Secure aggregation needs a clip: {where} is not set.")
    if rule.norm_bound is not None:  # norm bounding: each client clips its own update
        clip = min(clip, rule.norm_bound)
    if a.mode == "ckks":
        try:
            return he.Settings(
                scheme=a.he_scheme,
                clip_norm=clip,
                max_weight=max_weight,
                bits=a.bits,
                weighted=not user_dp and rule.weighs_by_examples,
                decryptors=a.decryptors,
                distributed=distributed,
            )
        except ValueError as exc:
            raise ConfigError(f"secure_aggregation: {exc}") from None
    return secagg.Settings(
        mode=secagg.Mode(a.mode),
        clip_norm=clip,
        max_weight=max_weight,
        bits=a.bits,
        # Robust rules weigh clients equally (claimed sizes buy no influence); of them only
        # norm bounding runs here, so its clipped updates are summed with weight 1 each.
        weighted=not user_dp and rule.weighs_by_examples,
        threshold=a.threshold,
        neighbours=a.neighbours,
        distributed=distributed,
        dropout_rate=a.dropout_rate,
    )


def run_pins(
    cfg: ExperimentConfig,
    plan: privacy.PrivacyPlan | None,
    settings: secagg.Settings | he.Settings | None,
    client_ids: Iterable[int],
    rule: Aggregator | None,
) -> ClientPins:
    """What the clients ``client_ids`` of ``cfg`` hold the server to: the run's secure-aggregation
    ``settings`` and the fit-task entries of its privacy ``plan`` (see :func:`client_pins`).
    ``rule`` is the run's aggregator (it sets the fewest inputs a masked sum may have; None
    without secure aggregation, which makes the only pins that use it)."""
    least = cfg.min_clients if rule is None or settings is None else min_clients(cfg, rule)
    return client_pins(
        settings,
        plan.client_config(cfg) if plan is not None else {},
        client_ids,
        min_cohort=least if cfg.server.sampling == "poisson" else cfg.clients_per_round,
        min_inputs=least,
        count_bucket=cfg.count_bucket,
    )


def config_pins(
    cfg: ExperimentConfig, model: ModelAdapter, client_id: int, num_train: int
) -> ClientPins:
    """The pins of a deployed client with its own data (``num_train`` training records) from the
    experiment's config alone, without the experiment's data set: the secure-aggregation
    settings, federation and cohort bounds the server derives from ``cfg``, and the DP the plan
    asks of this client.

    Local DP: at least ``privacy.noise_multiplier`` or, under ``privacy.target_epsilon``, the
    multiplier that keeps this client within the target over the configured rounds at its own
    sampling rate and steps (the plan calibrated for a federation of this client alone); a clip
    of at most ``privacy.max_grad_norm``. Distributed DP: the multiplier and noise shares follow
    from the config, the federation's size and ``model``'s size. A simulated client of ``cfg``
    holds the same pins, up to the weight cap (see below) and, under a local ``target_epsilon``,
    the multiplier (it pins the federation's, calibrated for the worst client, at least its own).
    As on the server, a local ``privacy.delta`` of at least ``1/num_train`` is refused.
    """
    if cfg.privacy.mode == "local":
        sizes = {client_id: num_train}
    else:  # user-level DP counts the federation's clients, not their records
        sizes = dict.fromkeys(range(cfg.data.num_clients), num_train)
    plan = privacy.build(cfg, sizes, model, sizes_known=False)
    # Under secure aggregation the server's aggregator sets the clip and the weights of the
    # masked sum; a plug-in is made here as the server makes it, without the server's model.
    rule = None
    if cfg.secure_aggregation.enabled:
        context = PluginContext(
            seed=cfg.experiment.seed,
            num_clients=cfg.data.num_clients,
            clients_per_round=cfg.clients_per_round,
            byzantine_f=cfg.server.byzantine_f,
        )
        rule = build_aggregator(cfg, context)
    # Without secure_aggregation.max_examples the server caps a client's weight at its largest
    # partition, which only the experiment's data set tells; this client's own size stands in.
    # The pins never compare the cap (secagg.Pins.check_setup holds the server to the graph
    # degree, threshold, clip and unweighted sums): it sets the fixed-point range of the sum, so
    # a server that picks another one can garble the sum but learns no more from it.
    settings = None
    if rule is not None:
        settings = secure_aggregation_settings(
            cfg, plan, rule, max_weight=cfg.secure_aggregation.max_examples or num_train
        )
    return run_pins(cfg, plan, settings, range(cfg.data.num_clients), rule)


def client_training_config(cfg: ExperimentConfig) -> dict[str, messages.Scalar]:
    """The local-training entries of every fit task (``[client]``)."""
    c = cfg.client
    return {
        "optimizer": c.optimizer,
        "lr": c.lr,
        "momentum": c.momentum,
        "weight_decay": c.weight_decay,
        "epochs": c.epochs,
        "batch_size": c.batch_size,
        "proximal_mu": c.proximal_mu,
        "max_steps": c.max_steps,
        "augment": c.augment,
        **personalization.task_config(cfg),
    }


@dataclass(frozen=True)
class ServerPlugins:
    """What ``[client]`` and ``[server]`` name, built: the clients' trainer, the server's
    aggregator and its strategy (central DP wrapped around it when the plan asks for it)."""

    trainer: ClientTrainer
    aggregator: Aggregator
    strategy: Strategy


def build_server_plugins(
    cfg: ExperimentConfig,
    plan: privacy.PrivacyPlan | None,
    num_clients: int,
    *,
    build_model: Callable[[], ModelAdapter] | None = None,
) -> ServerPlugins:
    """The trainer, aggregator and strategy of ``cfg`` over ``num_clients`` clients, under the
    privacy ``plan`` (its client settings in every fit task, central DP's noise), each a
    plug-in or a built-in, held to the same composition rules before round 1.
    ``build_model``: a fresh instance of the run's model, for a plug-in that wants one."""
    client_config = client_training_config(cfg)
    central_dp = None
    if plan is not None:
        client_config.update(plan.client_config(cfg))
        if plan.mode == "central":
            p = cfg.privacy
            try:
                central_dp = CentralDP(
                    clip_norm=p.clip_norm,
                    noise_multiplier=plan.noise_multiplier,
                    expected_clients=float(cfg.clients_per_round),
                    seed=cfg.experiment.seed,
                    adaptive=p.adaptive_clip,
                    target_quantile=p.target_quantile,
                    clip_learning_rate=p.clip_learning_rate,
                    count_stddev=p.clip_count_stddev or cfg.clients_per_round / 20.0,
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    s = cfg.server
    context = PluginContext(
        seed=cfg.experiment.seed,
        num_clients=num_clients,
        clients_per_round=cfg.clients_per_round,
        byzantine_f=s.byzantine_f,
        client_config=client_config,
        build_model=build_model,
    )
    trainer = build_trainer(cfg, context)
    context = replace(context, trainer=trainer)
    aggregator = build_aggregator(cfg, context)
    context = replace(context, aggregator=aggregator)
    base = _strategy(cfg, client_config, context, aggregator, num_clients)
    try:  # the same rules for fedguard's strategy, aggregator and trainer as for a user's
        config_checks.composition(cfg, strategy=base, rule=aggregator, trainer=trainer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    chosen = personalization.settings(cfg)
    if chosen is not None and chosen.method in personal.BODY_ONLY:
        if build_model is None:
            raise ConfigError(
                f'personalization.method = "{chosen.method}": the server needs the model to '
                "find its head"
            )
        base = personalization.shared_part(cfg, base, build_model())
    strategy = base if central_dp is None else CentralPrivacy(base, central_dp)
    return ServerPlugins(trainer, aggregator, strategy)


def _strategy(
    cfg: ExperimentConfig,
    client_config: Mapping[str, messages.Scalar],
    context: PluginContext,
    aggregator: Aggregator,
    num_clients: int,
) -> Strategy:
    """``server.strategy`` without central DP: a plug-in, or a built-in with its settings."""
    s = cfg.server
    if plugins.is_reference(s.strategy):
        made = _loaded(
            s.strategy,
            what="server.strategy",
            kind=Strategy,
            options=s.strategy_options,
            context=context,
        )
        return cast(Strategy, made)  # _loaded checked its kind
    try:
        return fedopt.create(
            StrategyKind(s.strategy),
            client_config=client_config,
            num_clients=num_clients,
            server_lr=s.server_lr,
            server_momentum=s.server_momentum,
            beta1=s.beta1,
            beta2=s.beta2,
            tau=s.tau,
            feddyn_alpha=s.feddyn_alpha,
            aggregator=aggregator,
            seed=cfg.experiment.seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def checked_secure_aggregation(
    cfg: ExperimentConfig,
    plan: privacy.PrivacyPlan | None,
    rule: Aggregator,
    sizes: Mapping[int, int],
) -> secagg.Settings | he.Settings | None:
    """The ``[secure_aggregation]`` settings for clients of ``sizes`` (a client's weight capped
    at ``max_examples``, else the largest size), the fixed-point range (and, under homomorphic
    encryption, the plaintext space) checked for the largest cohort a round can have."""
    settings = secure_aggregation_settings(
        cfg, plan, rule, max_weight=cfg.secure_aggregation.max_examples or max(sizes.values())
    )
    if settings is None:
        return None
    largest = len(sizes) if cfg.server.sampling == "poisson" else cfg.clients_per_round
    try:  # the largest cohort a round can have must fit the ring
        if isinstance(settings, he.Settings):
            settings.check_cohort(largest)
        else:
            settings.fixed_point(largest)
    except ValueError as exc:
        raise ConfigError(f"secure_aggregation.bits: {exc}") from None
    return settings


def build_driver(
    cfg: ExperimentConfig,
    transport: Transport,
    strategy: Strategy,
    aggregator: Aggregator,
    model: ModelAdapter,
    plan: privacy.PrivacyPlan | None,
    sizes: Mapping[int, int],
    identities: secagg.Identities | None = None,
    he_context: Any = None,
) -> RoundDriver:
    """The round driver over ``transport``; ``sizes`` are the most examples each client's reply
    may claim (its partition in simulation, its registration in deployment); ``identities``
    the clients' registered identity keys (secure aggregation then runs verified rounds);
    ``he_context`` the key-less HE parameters under ``mode = "ckks"``."""
    s = cfg.server
    return RoundDriver(
        transport,
        strategy,
        dim=model.spec.size,
        clients_per_round=cfg.clients_per_round,
        # asynchronous rounds take their minimum per buffer (build_async_driver)
        min_clients=min(min_clients(cfg, aggregator), cfg.clients_per_round),
        seed=cfg.experiment.seed,
        deadline_s=s.deadline_s,
        poisson=s.sampling == "poisson",
        secure_aggregation=checked_secure_aggregation(cfg, plan, aggregator, sizes),
        # A larger claim would buy weight in the mean; see RoundDriver.
        registered_examples=sizes,
        # Local DP: a reply must report DP-SGD that keeps to the plan (privacy.check_reply).
        reply_check=None if plan is None else plan.check_reply,
        identities=identities if cfg.secure_aggregation.server == "malicious" else None,
        he_context=he_context,
    )


def he_key(cfg: ExperimentConfig) -> Any:
    """A fresh HE secret key (a TenSEAL context) of ``[secure_aggregation] he_scheme``, for a
    simulated federation's clients under ``mode = "ckks"`` (None otherwise). Made once per run
    and handed to the client side only: the server gets :func:`server_context` of it."""
    a = cfg.secure_aggregation
    if not a.enabled or a.mode != "ckks":
        return None
    return he_encryption.secret_context(he_encryption.PARAMS[a.he_scheme])


def server_context(key: Any) -> Any:
    """The key-less context of ``key``: what a server needs to add ciphertexts."""
    return he_encryption.context_from_bytes(he_encryption.server_bytes(key), secret=False)


def latency_model(cfg: ExperimentConfig, client_ids: Iterable[int]) -> LatencyModel | None:
    """The simulated latency of ``[runtime.latency]`` over ``client_ids`` (None: not set)."""
    lat = cfg.runtime.latency
    if lat is None:
        return None
    return LatencyModel(
        tuple(client_ids),
        base=Base(lat.base),
        mean_s=lat.mean_s,
        sigma=lat.sigma,
        slow_fraction=lat.slow_fraction,
        slowdown=lat.slowdown,
        seed=cfg.experiment.seed if lat.seed is None else lat.seed,
    )


def build_async_driver(
    cfg: ExperimentConfig, driver: RoundDriver, aggregator: Aggregator
) -> AsyncDriver | None:
    """FedBuff over ``driver``'s transport with ``driver``'s reply checks (None in
    ``server.mode = "sync"``); a :class:`ConfigError` when the transport or the strategy
    cannot run it."""
    if cfg.server.mode != "async":
        return None
    if not driver.transport.supports_streams:
        raise ConfigError(
            f'server.mode = "async": {type(driver.transport).__name__} cannot dispatch tasks '
            'one at a time; run in process or use server.mode = "sync"'
        )
    try:
        return AsyncDriver(
            driver,
            AsyncSettings(
                concurrency=cfg.concurrency,
                buffer_size=cfg.buffer_size,
                max_staleness=cfg.max_staleness,
                staleness_exponent=cfg.staleness_exponent,
                min_updates=min_clients(cfg, aggregator),
            ),
        )
    except ValueError as exc:
        raise ConfigError(f'server.mode = "async": {exc}') from None


def canary_plan(cfg: ExperimentConfig, clients: Mapping[int, Any]) -> canary.CanaryPlan | None:
    """The run's ``audit.canaries`` (None: none) at ``audit.canary_level`` (``auto``: user-level
    canary clients under central or distributed DP, record-level canaries otherwise); the canary
    clients take the ids after the federation's."""
    a = cfg.audit
    if a.canaries == 0:
        return None
    kind = canary.level(cfg.privacy.mode, a.canary_level)
    seed = a.canary_seed if a.canary_seed is not None else cfg.experiment.seed
    ids = sorted(clients)
    return canary.plan(kind, a.canaries, seed, ids, first_new_id=max(ids) + 1)


def record_canaries(
    cfg: ExperimentConfig, fed: federation.Federation
) -> tuple[torch.Tensor, torch.Tensor]:
    """The record-level canaries of ``cfg`` over ``fed``'s training data's value range."""
    xs = [d.train_x for d in fed.clients.values()]
    low = min(float(x.min()) for x in xs)
    high = max(float(x.max()) for x in xs)
    seed = cfg.audit.canary_seed if cfg.audit.canary_seed is not None else cfg.experiment.seed
    return canary.record_canaries(
        seed, cfg.audit.canaries, fed.input_shape, fed.num_classes, low, high
    )


def user_canary_directions(plan: canary.CanaryPlan, dim: int) -> dict[int, torch.Tensor]:
    """The included user-level canaries' directions, by the client id each canary has."""
    chosen = [i for i, inc in enumerate(plan.included) if inc]
    return {
        cid: canary.direction(plan.seed, i, dim)
        for cid, i in zip(plan.clients, chosen, strict=True)
    }


class Experiment:
    """One configured experiment, set up and ready to run rounds."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        model_fn: Callable[..., Any] | None = None,
        data_fn: federation.DataFn | None = None,
        transport_fn: TransportFn | None = None,
        privacy_spent: privacy.Spent | None = None,
        identities: secagg.Identities | None = None,
        he_context: Any = None,
    ) -> None:
        """``privacy_spent``: a resumed run's finished rounds and their DP noise multipliers;
        ``identities``: the registered identity keys of the clients behind ``transport_fn``
        (a simulated federation derives its own: :func:`simulated_identities`);
        ``he_context``: under ``mode = "ckks"``, the key-less HE parameters the clients behind
        ``transport_fn`` were provisioned with (a simulated federation makes its own key)."""
        self.cfg = cfg
        self.fed = federation.build_federation(cfg, data_fn)
        fed_x, fed_y = self.fed.eval_x, self.fed.eval_y
        # One plan per simulated behaviour (disjoint clients; at most one rewrites replies).
        self.attacks = federation.attack_plans(cfg, self.fed)
        for plan in self.attacks:
            if plan.poisons_data:
                self.fed = federation.poison_clients(
                    self.fed,
                    plan.malicious,
                    functools.partial(federation.poison_data, plan, self.fed.num_classes),
                )
        try:
            self.model = models.build(
                cfg.model.name,
                framework=cfg.model.framework,
                input_shape=self.fed.input_shape,
                num_classes=self.fed.num_classes,
                seed=cfg.experiment.seed,
                builder=model_fn,
            )
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"model.name: {exc}") from None
        # audit.canaries: record-level canaries join the clients' data, user-level canary clients
        # the population (their trainer is set below), before sizes and privacy are planned
        self.canaries = canary_plan(cfg, self.fed.clients)
        self.canary_digest: str | None = None
        self.canary_records: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.canaries is not None and self.canaries.kind == canary.RECORD:
            x, y = record_canaries(cfg, self.fed)
            self.canary_digest = canary.digest(x, y)
            self.canary_records = (x, y)
            self.fed = replace(
                self.fed, clients=canary.insert_records(self.fed.clients, self.canaries, x, y)
            )
        elif self.canaries is not None:
            # A canary client holds a typical (the median) client's number of examples, so
            # that it weighs in the average (and under any weight cap) like a typical client;
            # the rows are views of one example, as its trainer never reads them.
            typical = int(np.median([d.num_train for d in self.fed.clients.values()]))
            host = next(iter(self.fed.clients.values()))
            stand_in = ClientData(
                host.train_x[:1].expand(typical, *host.train_x.shape[1:]),
                host.train_y[:1].expand(typical),
                host.train_x[:0],
                host.train_y[:0],
            )
            added = dict.fromkeys(self.canaries.clients, stand_in)
            self.fed = replace(self.fed, clients={**self.fed.clients, **added})
        first = next(iter(self.fed.clients.values())).train_x[:1]
        check_output_width(
            self.model, first, self.fed.num_classes, f"model.name {cfg.model.name!r}"
        )
        check_model_io(cfg, self.fed.input_shape, self.fed.num_classes)
        personalization.check_simulation(cfg)
        personalization.check_model(cfg, self.model)
        self.mode = cfg.evaluation.resolved_mode(deployed=False)
        owned = server_data(cfg, self.fed.input_shape, self.fed.num_classes)
        # The evaluation set the server owns: evaluation.server_data, else the data set's split.
        self.eval_x, self.eval_y = owned if owned is not None else (fed_x, fed_y)
        self.eval_groups = None if owned is not None else self.fed.eval_groups
        sizes = {i: d.num_train for i, d in self.fed.clients.items()}
        # Deployed clients hold their own data: the partition's sizes are only the server's
        # copy, so local DP composes the rates and steps the clients report (see privacy.build).
        self.privacy = privacy.build(
            cfg, sizes, self.model, privacy_spent, sizes_known=transport_fn is None
        )
        built = build_server_plugins(
            cfg,
            self.privacy,
            len(self.fed.clients),
            build_model=functools.partial(self._fresh_model, model_fn),
        )
        self.trainer, self.aggregator, self.strategy = (
            built.trainer,
            built.aggregator,
            built.strategy,
        )
        if self.canaries is not None and self.canaries.kind == canary.USER:
            self.trainer = canary.CanaryClientTrainer(
                self.trainer,
                user_canary_directions(self.canaries, self.model.spec.size),
                cfg.privacy.clip_norm,
            )
        elif self.canaries is not None and self.canaries.kind == canary.GRADIENT:
            coordinates = canary.gradient_coordinates(
                self.canaries.seed, self.canaries.count, self.model
            )
            self.trainer = canary.GradientCanaryTrainer(
                self.trainer, canary.hosted_coordinates(self.canaries, coordinates)
            )
        self.client_state: dict[int, dict[str, torch.Tensor]] = {}
        # The clients hold the server to this config's privacy settings, as a deployed client
        # holds it to its own copy (see client_pins): a round asking for less is refused.
        pins = run_pins(
            cfg,
            self.privacy,
            checked_secure_aggregation(cfg, self.privacy, self.aggregator, sizes),
            self.fed.clients,
            self.aggregator,
        )
        # the clients that hold held-out data (their share of the evaluation split, or of their
        # own partition with data.client_eval_fraction)
        self.eval_clients = [
            cid
            for cid, d in self.fed.clients.items()
            if d.eval_y is not None and int(d.eval_y.shape[0]) > 0
        ]
        ids = list(self.fed.clients)
        self.latency = latency_model(cfg, self.fed.clients)
        on_ray = transport_fn is None and cfg.runtime.kind == "ray"
        # Under Ray the actors hold the clients' data; this process keeps their ids and sizes.
        data = {} if on_ray else self.fed.clients
        key = None
        if transport_fn is None:
            identities = config_checks.simulated_identities(cfg)
            # mode = "ckks": the federation's key, made once per run, goes to the clients only;
            # the server gets the key-less parameters
            key = he_key(cfg)
            if key is not None:
                he_context = server_context(key)
        self.app = ClientApp(
            self.model,
            data,
            self.client_state,
            pins=pins,
            trainer=self.trainer,
            identities=identities if transport_fn is None else None,
            he_key=key if transport_fn is None else None,
        )
        del key
        # Deployment passes its own transport (gRPC); the round code is the same either way.
        self._owns_transport = transport_fn is None
        self.transport: Transport
        if transport_fn is not None:
            self.transport = transport_fn(ids)
        elif on_ray:  # the driver drops its copy of the clients' data before the actors load
            self.fed = replace(self.fed, clients={})
            self.transport = self._ray_transport(pins, model_fn, data_fn, ids)
        else:
            self.transport = engines.local_transport(cfg, self.app, ids, self.latency)
        self._client_ids = ids
        for plan in self.attacks:
            if not plan.poisons_data:
                self.transport = attack.ModelPoisoning(
                    self.transport, plan.malicious, plan.model_attack(), seed=plan.seed
                )
        try:
            self.driver = build_driver(
                cfg,
                self.transport,
                self.strategy,
                self.aggregator,
                self.model,
                self.privacy,
                sizes,
                identities,
                he_context,
            )
            self.async_driver = build_async_driver(cfg, self.driver, self.aggregator)
        except BaseException:
            self.close()
            raise
        self.last_federated: FederatedEvaluation | None = None
        self.initial_params = self.model.get_flat()
        self.backdoor_test = self._backdoor_test()

    def _ray_transport(
        self,
        pins: ClientPins,
        model_fn: Callable[..., Any] | None,
        data_fn: federation.DataFn | None,
        ids: list[int],
    ) -> Transport:
        """``runtime.kind = "ray"``: the pool of actors that build and serve the clients."""
        client_config = client_training_config(self.cfg)
        if self.privacy is not None:
            client_config.update(self.privacy.client_config(self.cfg))
        poisoning = tuple(plan for plan in self.attacks if plan.poisons_data)
        clients = ray_runtime.SimulatedClients(
            self.cfg, pins, client_config, model_fn, data_fn, poisoning
        )
        return ray_runtime.transport(clients, ids, self.client_state)

    def close(self) -> None:
        """Release the transport this experiment started (the Ray pool); one passed in through
        ``transport_fn`` is its caller's to close."""
        if self._owns_transport:
            self.transport.close()

    def contribution_utility(self) -> Callable[[torch.Tensor], float] | None:
        """The utility of a model for contribution scores: its negative loss on the data set's
        validation split (None when ``contribution.method`` needs none); a
        :class:`ConfigError` with the reason when the data set has no validation split."""
        method = self.cfg.contribution.method
        if method in ("none", "cosine"):
            return None
        if self.fed.val_x is None or self.fed.val_y is None:
            raise ConfigError(
                f'contribution.method = "{method}" values updates on the data set\'s validation '
                f'split (contribution.validation = "val"); {self.fed.dataset_name!r} has none: '
                'use a data set with one, or contribution.method = "cosine" (no validation)'
            )
        return negative_loss(self.model, self.fed.val_x, self.fed.val_y, self.cfg)

    def _fresh_model(self, model_fn: Callable[..., Any] | None) -> ModelAdapter:
        """Another instance of the run's model, as initialised (for a plug-in's own use)."""
        cfg = self.cfg
        return models.build(
            cfg.model.name,
            framework=cfg.model.framework,
            input_shape=self.fed.input_shape,
            num_classes=self.fed.num_classes,
            seed=cfg.experiment.seed,
            builder=model_fn,
        )

    def _backdoor_test(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The central test images whose label is not the target, with the trigger stamped in."""
        b = self.backdoor()
        if b is None:
            return None
        keep = self.eval_y != b.target
        if not bool(keep.any()):
            raise ConfigError(
                f"attack.target_label={b.target}: every test label is the target, so the "
                "backdoor's success rate is undefined"
            )
        x = attacks_data.stamp_trigger(self.eval_x[keep], b.trigger)
        return x, self.eval_y[keep]

    @property
    def client_ids(self) -> list[int]:
        return list(self._client_ids)

    @property
    def class_names(self) -> list[str]:
        return self.fed.class_names

    def partition(self) -> dict[str, Any]:
        """What ``partition.json`` says: the partition, label counts per client."""
        return federation.describe(self.fed)

    def partition_histogram(self) -> list[list[int]]:
        """Per client, its examples of each class (``plots/partition.png``)."""
        return self.fed.histogram

    @property
    def histogram_names(self) -> list[str]:
        """What each column of :meth:`partition_histogram` counts."""
        return self.fed.class_names

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint records beyond the model and privacy (nothing in simulation)."""
        return {}

    def evaluate_round(self, round_: int, params: torch.Tensor) -> dict[str, Any]:
        """The metrics of an evaluated round, per ``evaluation.mode``: the server's evaluation
        set and/or the clients' reports on their held-out data, added up (see
        :class:`.config.EvaluationSection`)."""
        out: dict[str, Any] = {}
        if self.mode in ("server", "both"):
            out.update(self.evaluate(params))
        if self.mode in ("federated", "both"):
            fed = self.driver.evaluate_round(
                round_, params, clients=self.eval_clients, num_classes=self.fed.num_classes
            )
            self.last_federated = fed
            out.update(federated_metrics(fed, "test" if self.mode == "federated" else "federated"))
        if self.mode == "federated":
            out["backdoor_success"] = self._backdoor_success(params)
        out.update(
            personalization.evaluate(
                self.cfg,
                self.driver.transport,
                round_,
                params,
                # a client too small to hold out its own examples answers that it holds no
                # held-out data of its own, and is not counted (as deployed)
                self.eval_clients,
                client_training_config(self.cfg),
                self.driver.deadline_s,
            )
        )
        return out

    def evaluate(self, params: torch.Tensor) -> dict[str, Any]:
        """Central test metrics, and the backdoor's success rate (None without a backdoor)."""
        self.model.set_flat(params)
        out = central_metrics(self.model, self.eval_x, self.eval_y, self.cfg.evaluation.batch_size)
        out["backdoor_success"] = self._backdoor_success(params)
        return out

    def _backdoor_success(self, params: torch.Tensor) -> float | None:
        """The share of triggered test images classified as the target (None without one)."""
        self.model.set_flat(params)
        out: dict[str, Any] = {"backdoor_success": None}
        if self.backdoor_test is not None:
            backdoor = self.backdoor()
            if backdoor is None:
                raise RuntimeError("A backdoor test set is kept without a backdoor attack.")
            x, y = self.backdoor_test
            _, probabilities = evaluation.evaluate_with_probabilities(
                self.model, x, y, batch_size=self.cfg.evaluation.batch_size
            )
            out["backdoor_success"] = attacks_data.attack_success_rate(
                probabilities.argmax(dim=1), y, target=backdoor.target
            )
        return out["backdoor_success"]

    def backdoor(self) -> attack.Backdoor | None:
        """The simulated backdoor's trigger and target (None without one)."""
        return next((p.backdoor for p in self.attacks if p.backdoor is not None), None)

    def malicious(self) -> list[int]:
        """Every simulated attacker or low-value client, whatever its behaviour, sorted."""
        return sorted(c for plan in self.attacks for c in plan.malicious)

    def attack_summary(self) -> dict[str, Any] | None:
        """What ``summary.json`` says about the simulated attack (None without one): the kind(s)
        and fraction(s) as configured, every malicious id, and the ids of each behaviour."""
        if not self.attacks:
            return None
        a = self.cfg.attack
        return {
            "kind": a.kind,
            "fraction": a.fraction,
            "seed": self.attacks[0].seed,
            "malicious": self.malicious(),
            "by_kind": {k: list(p.malicious) for k, p in zip(a.kinds(), self.attacks, strict=True)},
        }

    def final_report(self, params: torch.Tensor) -> dict[str, Any]:
        """Confusion matrix and, where the test set names its owners, accuracy per owner; under
        ``evaluation.mode = "federated"`` the clients' confusion matrices of the last evaluated
        round, added up."""
        if self.mode == "federated":
            return federated_report(self.last_federated)
        self.model.set_flat(params)
        return confusion_report(
            self.model, self.eval_x, self.eval_y, self.eval_groups, self.cfg.evaluation.batch_size
        )

    def should_evaluate(self, round_: int) -> bool:
        every = self.cfg.evaluation.every
        return round_ == self.cfg.experiment.rounds or (every > 0 and round_ % every == 0)

    def checkpoint_tensors(
        self, params: torch.Tensor, state: StrategyState
    ) -> dict[str, torch.Tensor]:
        tensors = {"params": params}
        tensors.update({f"server.{k}": v for k, v in state.items()})
        for cid, named in self.client_state.items():
            tensors.update({f"client.{cid}.{k}": v for k, v in named.items()})
        return tensors

    def restore(self, ck: checkpoint.Checkpoint) -> tuple[torch.Tensor, StrategyState]:
        params = ck.tensors["params"]
        self.model.spec.check_vector(params)
        server = {
            k.removeprefix("server."): v for k, v in ck.tensors.items() if k.startswith("server.")
        }
        self.client_state.clear()
        for key, value in ck.tensors.items():
            if key.startswith("client."):
                _, cid, name = key.split(".", 2)
                self.client_state.setdefault(int(cid), {})[name] = value
        return params, self.strategy.restore(server)
