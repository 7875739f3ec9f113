"""From a config to a federation: the data split over clients, the central test set, the model."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from fedguard import plugins
from fedguard.algorithms import attacks
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.algorithms.robust import base as robust_base
from fedguard.client.data import ClientData
from fedguard.data import partition as partitioners
from fedguard.data import registry
from fedguard.data.dataset import (
    ArrayDataset,
    DatasetSplits,
    FederatedDataset,
    OnDemandDataset,
    TrainingSet,
    check_arrays,
    check_on_demand,
)
from fedguard.data.errors import DataError
from fedguard.experiment.config import ConfigError, DataSection, ExperimentConfig
from fedguard.experiment.plugin_context import PluginContext
from fedguard.simulation import attack

DataFn = Callable[..., DatasetSplits | FederatedDataset]


@dataclass(frozen=True)
class Federation:
    """Per-client tensors, the central evaluation set and what the model must accept."""

    clients: dict[int, ClientData]
    client_names: list[str]
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    histogram: list[list[int]]
    dataset_name: str
    eval_groups: list[str] | None = None
    # the data set's validation split (None when it has none): contribution scores' utility
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None


def _tensor(d: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(d.x, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(d.y, dtype=np.int64))
    return x, y


@dataclass(frozen=True)
class OnDemandRows:
    """A client's features made from its part of an :class:`OnDemandDataset` on every call
    (:class:`~fedguard.client.data.Rows`): the client holds its labels and sample indices only."""

    data: OnDemandDataset

    def __call__(self) -> torch.Tensor:
        return torch.from_numpy(self.data.rows())


def _client_data(
    d: TrainingSet,
    eval_fraction: float,
    rng: np.random.Generator,
    share: tuple[torch.Tensor, torch.Tensor],
) -> ClientData:
    """A client's tensors: its partition and its held-out data, the ``eval_fraction`` of its
    partition kept out of training (its own) or, when it keeps none (:func:`holds_out`), its
    ``share`` of the evaluation split (not its own: no personal model is evaluated on it).
    A part of an :class:`OnDemandDataset` stays on demand (its features made when read)."""
    n = len(d)
    k = int(round(eval_fraction * n))
    if isinstance(d, OnDemandDataset):
        y = torch.from_numpy(np.ascontiguousarray(d.y, dtype=np.int64))
        if not holds_out(n, eval_fraction):
            return ClientData(OnDemandRows(d), y, *share, own_eval=False)
        order = rng.permutation(n)
        held, kept = order[:k], order[k:]
        return ClientData(
            OnDemandRows(d.subset(kept)),
            y[torch.from_numpy(kept)],
            OnDemandRows(d.subset(held)),
            y[torch.from_numpy(held)],
        )
    x, y = _tensor(d)
    if not holds_out(n, eval_fraction):
        return ClientData(x, y, *share, own_eval=False)
    permutation = torch.from_numpy(rng.permutation(n))
    held_t, kept_t = permutation[:k], permutation[k:]
    return ClientData(x[kept_t], y[kept_t], x[held_t], y[held_t])


def holds_out(n: int, eval_fraction: float) -> bool:
    """Whether a partition of ``n`` examples keeps ``eval_fraction`` of them out of training:
    at least one held out and one left to train on (else the client evaluates on its share of
    the evaluation split)."""
    return 0 < int(round(eval_fraction * n)) < n


def evaluation_shares(
    x: torch.Tensor, y: torch.Tensor, num_clients: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation split dealt out to ``num_clients`` clients (a seeded shuffle cut into
    near-equal parts): each client's held-out data when it keeps none of its own, so that the
    clients' evaluations, added up, are the evaluation on the whole split."""
    order = torch.from_numpy(np.random.default_rng([seed, 0x7E57]).permutation(len(y)))
    return [(x[part], y[part]) for part in torch.tensor_split(order, num_clients)]


def load_data(
    cfg: ExperimentConfig, data_fn: DataFn | None = None
) -> DatasetSplits | FederatedDataset:
    """Load the configured data set (or call the user's data function)."""
    d = cfg.data
    if data_fn is not None:
        out = data_fn()
        if not isinstance(out, DatasetSplits | FederatedDataset):
            raise ConfigError(
                f"The data function returned {type(out).__name__}; expected DatasetSplits or "
                "FederatedDataset."
            )
        return out
    try:
        return registry.load_dataset(
            d.dataset,
            path=d.path,
            seed=cfg.experiment.seed,
            test_fraction=d.test_fraction,
            synthetic_samples=d.synthetic_samples,
            input_shape=tuple(d.synthetic_shape),
            num_classes=d.synthetic_classes,
            synthetic_on_demand=d.synthetic_on_demand,
            augment_copies=d.augment_copies,
            feature_norm=d.feature_norm,
            audio=audio_settings(d),
            # the validation split: to evaluate on it, or as contribution scores' utility
            validation=cfg.evaluation.split == "val"
            or cfg.contribution.method not in ("none", "cosine"),
        )
    except ValueError as exc:
        raise ConfigError(f"data.dataset: {exc}") from None


def check_data(loaded: DatasetSplits | FederatedDataset, source: str) -> None:
    """Refuse data that would fail only once training runs, naming ``source`` and the split.

    Every split must hold numeric, finite features of one sample shape and whole-number labels
    in ``0 .. num_classes - 1``; the training sets and the test set must not be empty.
    """
    k = loaded.num_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"{source}: num_classes = {k!r}; expected a positive integer")
    if isinstance(loaded, FederatedDataset):
        train = [(f"the training data of client {n!r}", d) for n, d in loaded.clients.items()]
    else:
        train = [("the training set", loaded.train)]
    splits = [*train, ("the test set", loaded.test)]
    if loaded.val is not None:
        splits.append(("the validation set", loaded.val))
    shape = None
    for what, d in splits:
        try:
            if isinstance(d, OnDemandDataset):
                check_on_demand(d, num_classes=int(k), what=what)
            else:
                check_arrays(d.x, d.y, num_classes=int(k), what=what)
        except DataError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if shape is None:
            shape = d.sample_shape
        elif d.sample_shape != shape:
            raise ConfigError(
                f"{source}: {what} has samples of shape {d.sample_shape} but "
                f"{splits[0][0]} has {shape}"
            )


def audio_settings(d: DataSection) -> dict[str, Any]:
    """The fsdd feature settings of ``[data]`` that differ from their defaults."""
    fields = DataSection.model_fields
    names = ("trim_db", "dynamic_range_db")
    return {n: getattr(d, n) for n in names if getattr(d, n) != fields[n].default}


def build_federation(cfg: ExperimentConfig, data_fn: DataFn | None = None) -> Federation:
    """Load, partition and tensorise the data; every sample lands on exactly one client."""
    loaded = load_data(cfg, data_fn)
    check_data(
        loaded, "the data function" if data_fn is not None else f"data.dataset {cfg.data.dataset!r}"
    )
    rng = np.random.default_rng([cfg.experiment.seed, 0xDA7A])
    if isinstance(loaded, FederatedDataset):
        names = list(loaded.clients)
        parts_data = [loaded.clients[n] for n in names]
        num_classes, class_names, name = loaded.num_classes, list(loaded.class_names), "custom"
        test, val = loaded.test, loaded.val
        if cfg.data.num_clients != len(names):
            raise ConfigError(
                f"data.num_clients={cfg.data.num_clients} but the data function returned "
                f"{len(names)} clients: set data.num_clients = {len(names)}"
            )
    else:
        parts_data, names = _partition(cfg, loaded, rng)
        num_classes, class_names, name = loaded.num_classes, list(loaded.class_names), loaded.name
        test, val = loaded.test, loaded.val
    val_x, val_y = _tensor(val) if val is not None else (None, None)
    if cfg.evaluation.split == "val":
        if val is None:
            raise ConfigError(
                f'evaluation.split: the data set {name!r} has no validation split; use "test"'
            )
        test = val
    class_names = class_names or [str(c) for c in range(num_classes)]
    eval_x, eval_y = _tensor(test)
    shares = evaluation_shares(eval_x, eval_y, len(parts_data), cfg.experiment.seed)
    clients = {
        i: _client_data(part, cfg.data.client_eval_fraction, rng, shares[i])
        for i, part in enumerate(parts_data)
    }
    histogram = [np.bincount(p.y, minlength=num_classes).astype(int).tolist() for p in parts_data]
    eval_groups = None if test.groups is None else [str(g) for g in test.groups]
    input_shape = parts_data[0].sample_shape
    return Federation(
        clients,
        names,
        eval_x,
        eval_y,
        num_classes,
        input_shape,
        class_names,
        histogram,
        name,
        eval_groups,
        val_x,
        val_y,
    )


def attack_plans(cfg: ExperimentConfig, fed: Federation) -> tuple[attack.Plan, ...]:
    """The ``[attack]`` of a simulated run, one plan per behaviour (none without an attack):
    disjoint malicious clients drawn with its seed (:func:`attacks.choose_groups`), a backdoor's
    trigger, or the plug-in attack it names (made with ``attack.options``).

    The backdoor's trigger value is the largest training pixel of the whole federation, so that
    the clients' stamps and the test set's are the same square.
    """
    a = cfg.attack
    if a.kind == "none":
        return ()
    seed = a.seed if a.seed is not None else cfg.experiment.seed
    groups = attacks.choose_groups(list(fed.clients), a.fractions(), seed)
    if isinstance(a.kind, str) and plugins.is_reference(a.kind):
        context = PluginContext(
            seed=seed,
            num_clients=len(fed.clients),
            clients_per_round=cfg.clients_per_round,
            byzantine_f=cfg.server.byzantine_f,
        )
        try:
            made = plugins.load(a.kind, what="attack.kind", options=a.options, context=context)
            plugins.check_kind(made, attack.Attack, spec=a.kind, what="attack.kind")
        except plugins.PluginError as exc:
            raise ConfigError(str(exc)) from None
        return (attack.Plan(None, tuple(groups[0]), seed, plugin=cast(attack.Attack, made)),)
    return tuple(
        attack.Plan(
            a.config(kind), tuple(group), seed, _backdoor(cfg, fed) if kind == "backdoor" else None
        )
        for kind, group in zip(a.kinds(), groups, strict=True)
    )


def _backdoor(cfg: ExperimentConfig, fed: Federation) -> attack.Backdoor:
    """The backdoor of ``[attack]``: its trigger, checked against the images, and its target."""
    a = cfg.attack
    if len(fed.input_shape) != 3:
        raise ConfigError(
            'attack.kind = "backdoor" stamps a pixel trigger into [C, H, W] images; '
            f"{fed.dataset_name!r} has inputs of shape {fed.input_shape}"
        )
    if a.target_label >= fed.num_classes:
        raise ConfigError(
            f"attack.target_label={a.target_label} is not a class of {fed.dataset_name!r}: "
            f"allowed 0..{fed.num_classes - 1}"
        )
    value = max(float(d.train_x.max()) for d in fed.clients.values())
    trigger = attacks_data.Trigger(size=a.trigger_size, value=value)
    try:
        attacks_data.trigger_mask(fed.input_shape[1], fed.input_shape[2], trigger)
    except robust_base.RobustnessError as exc:
        raise ConfigError(f"attack.trigger_size: {exc}") from None
    return attack.Backdoor(trigger, a.target_label, a.poisoned_fraction)


def poison_clients(
    fed: Federation,
    malicious: Collection[int],
    poison: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Federation:
    """A copy of ``fed`` whose ``malicious`` clients train on ``poison(id, x, y)`` instead.

    Simulation only (data poisoning, :mod:`fedguard.simulation.attack`). The partition summary
    keeps the labels as they were dealt, before the attack rewrote them.
    """
    clients = dict(fed.clients)
    for cid in malicious:
        data = clients[cid]
        x, y = poison(cid, data.train_x, data.train_y)
        clients[cid] = replace(data, train_x=x, train_y=y)
    return replace(fed, clients=clients)


def poison_data(
    plan: attack.Plan, num_classes: int, client_id: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training data a malicious client of the data-poisoning ``plan`` trains on instead of
    ``x``, ``y`` (seeded per client, so every engine poisons it the same way)."""
    if plan.config is None:
        raise ValueError("A plug-in attack poisons updates, not training data.")
    return attack.poison_training_data(
        x,
        y,
        kind=plan.config.kind,
        num_classes=num_classes,
        backdoor=plan.backdoor,
        generator=plan.client_generator(client_id),
        label_noise=plan.config.label_noise,
    )


def _partition(
    cfg: ExperimentConfig, splits: DatasetSplits, rng: np.random.Generator
) -> tuple[list[TrainingSet], list[str]]:
    d = cfg.data
    train = splits.train
    try:
        if d.partition == "natural":
            if train.groups is None:
                raise ConfigError(
                    f'data.partition: "natural" needs a data set with owners (speaker, site); '
                    f"{splits.name!r} has none: use iid, dirichlet or shards"
                )
            parts, names = partitioners.natural(train.groups)
            if len(parts) != d.num_clients:
                raise ConfigError(
                    f"data.num_clients={d.num_clients} but the natural partition of "
                    f"{splits.name!r} has {len(parts)} owners: set data.num_clients = {len(parts)}"
                )
        else:
            parts = partitioners.partition(
                d.partition,
                train.y,
                num_clients=d.num_clients,
                rng=rng,
                alpha=d.alpha,
                shards_per_client=d.shards_per_client,
            )
            names = [f"client_{i}" for i in range(len(parts))]
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data.partition: {exc}") from None
    return [train.subset(p) for p in parts], names


def describe(fed: Federation) -> dict[str, Any]:
    """The partition summary written to ``partition.json``."""
    sizes = [sum(row) for row in fed.histogram]
    return {
        "dataset": fed.dataset_name,
        "num_clients": len(fed.clients),
        "class_names": fed.class_names,
        "clients": [
            {"id": i, "name": n, "num_samples": s, "label_counts": row}
            for i, (n, s, row) in enumerate(
                zip(fed.client_names, sizes, fed.histogram, strict=True)
            )
        ],
        "total_samples": sum(sizes),
        "eval_samples": int(fed.eval_y.shape[0]),
    }
