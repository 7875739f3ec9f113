"""Training data made on demand (``data.synthetic_on_demand``, :class:`OnDemandDataset`).

A sample's features are a function of its index alone, so a client's images can be made when it
trains and dropped after: these tests pin the values (the Philox definition, any order, any
grouping), what stays the same as the default synthetic set (labels, prototypes, test set,
partition), that a federation of 10,000 clients holds labels only, and that a run on demand is
the run on the same data held in memory.
"""

from __future__ import annotations

import pickle
import time
import tracemalloc
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedguard.client.data import ClientData
from fedguard.data import registry, synthetic
from fedguard.data.dataset import ArrayDataset, DatasetSplits, FederatedDataset, OnDemandDataset
from fedguard.data.errors import DataError
from fedguard.experiment import config, federation
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(on_demand: bool, **kwargs: Any) -> DatasetSplits:
    args = {"num_samples": 600, "input_shape": (1, 6, 6), "num_classes": 3, "seed": 5}
    return synthetic.make_synthetic(**{**args, "test_samples": 50, **kwargs}, on_demand=on_demand)


def test_on_demand_rows_follow_their_definition_in_any_order() -> None:
    """Sample ``i`` is its prototype plus the first D normals of Philox(key, counter (0,0,0,i)),
    whichever samples it is made with and in whatever order."""
    data = _pair(True)
    assert isinstance(data.train, OnDemandDataset)
    rows = data.train.make
    assert isinstance(rows, synthetic.SyntheticRows)
    picked = np.array([599, 0, 17, 17, 300])
    together = rows(picked)
    assert together.shape == (5, 1, 6, 6) and together.dtype == np.float32
    for row, i in zip(together, picked, strict=True):
        bits = np.random.Philox(key=rows.key, counter=np.array([0, 0, 0, i], dtype=np.uint64))
        noise = np.random.Generator(bits).standard_normal(36, dtype=np.float32)
        expected = (noise + rows.prototypes[data.train.y[i]]).reshape(1, 6, 6)
        np.testing.assert_array_equal(row, expected)
        np.testing.assert_array_equal(rows(np.array([i]))[0], row)
    np.testing.assert_array_equal(together[2], together[3])
    # the whole set, made at once, is the same rows again
    np.testing.assert_array_equal(data.train.rows()[picked], together)
    with pytest.raises(IndexError, match=r"0\.\.599"):
        rows(np.array([600]))


def test_on_demand_keeps_labels_prototypes_and_test_set() -> None:
    """Only the training noise differs from the default synthetic set: same labels, same test
    set, the same class means (the samples are other draws around the same prototypes)."""
    held, made = _pair(False), _pair(True)
    assert isinstance(made.train, OnDemandDataset)
    np.testing.assert_array_equal(made.train.y, held.train.y)
    np.testing.assert_array_equal(made.test.x, held.test.x)
    np.testing.assert_array_equal(made.test.y, held.test.y)
    assert made.input_shape == held.input_shape == (1, 6, 6)
    x = made.train.rows()
    assert not np.array_equal(x, held.train.x)
    for c in range(3):
        mine, theirs = x[made.train.y == c].mean(axis=0), held.train.x[held.train.y == c].mean(0)
        # 200 samples of unit noise a class: the means agree to about 4 / sqrt(200) = 0.28
        assert float(np.abs(mine - theirs).max()) < 0.5
    again = _pair(True)
    np.testing.assert_array_equal(again.train.rows(), x)
    noisy = _pair(True, noise_std=0.5)
    proto = noisy.train.make.prototypes[noisy.train.y]  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        noisy.train.rows().reshape(600, -1) - proto, (x.reshape(600, -1) - proto) * 0.5, atol=1e-6
    )


def test_subsets_compose_indices_and_make_nothing_until_read() -> None:
    calls: list[np.ndarray] = []

    def make(indices: np.ndarray) -> np.ndarray:
        calls.append(indices.copy())
        return np.repeat(indices.astype(np.float32)[:, None], 2, axis=1)

    data = OnDemandDataset(make, np.arange(10) % 2, (2,), groups=np.arange(10) // 5)
    part = data.subset(np.array([9, 3, 4])).subset(np.array([2, 0]))
    assert calls == [] and len(part) == 2
    np.testing.assert_array_equal(part.index, [4, 9])
    np.testing.assert_array_equal(part.y, [0, 1])
    np.testing.assert_array_equal(part.groups, [0, 1])
    np.testing.assert_array_equal(part.rows(), [[4.0, 4.0], [9.0, 9.0]])
    np.testing.assert_array_equal(part.materialise().x, part.rows())
    assert len(calls) == 3  # made on every read, never kept
    bad = OnDemandDataset(lambda i: np.zeros((len(i), 3), np.float32), np.zeros(4), (2,))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) for 2 samples of shape \(2,\)"):
        bad.rows(np.array([0, 1]))


class _Counted:
    """Rows that count how often they are made."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.calls = x, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.x.clone()


def test_client_data_makes_on_demand_features_on_every_read() -> None:
    rows = _Counted(torch.arange(6.0).view(3, 2))
    data = ClientData(rows, torch.tensor([0, 1, 0]))
    assert data.on_demand and data.num_train == 3 and data.eval_x is None
    assert rows.calls == 0  # sizes and labels cost nothing
    first, second = data.train_x, data.train_x
    assert rows.calls == 2 and torch.equal(first, second) and first is not second
    held = ClientData(torch.ones(2, 2), torch.zeros(2), _Counted(torch.zeros(1, 2)), torch.zeros(1))
    assert not held.on_demand and held.eval_x is not None and tuple(held.eval_x.shape) == (1, 2)
    # dataclasses.replace works, and the copy holds what it read
    poisoned = replace(data, train_y=torch.tensor([2, 2, 2]))
    assert not poisoned.on_demand and torch.equal(poisoned.train_x, first)
    copied = pickle.loads(pickle.dumps(ClientData(_Counted(torch.ones(1, 1)), torch.zeros(1))))
    assert copied.on_demand and torch.equal(copied.train_x, torch.ones(1, 1))


def _cfg(**data: Any) -> config.ExperimentConfig:
    return config.validate(tiny_config(data=data))


@pytest.mark.parametrize("eval_fraction", [0.0, 0.25])
def test_federation_on_demand_matches_the_held_partition(eval_fraction: float) -> None:
    """The same clients, labels, held-out split and evaluation shares as the default; each
    client's features are those of its sample indices, made when read."""
    held = federation.build_federation(_cfg(client_eval_fraction=eval_fraction))
    made = federation.build_federation(
        _cfg(client_eval_fraction=eval_fraction, synthetic_on_demand=True)
    )
    assert made.histogram == held.histogram and made.input_shape == held.input_shape
    assert torch.equal(made.eval_x, held.eval_x)
    for cid, h in held.clients.items():
        m = made.clients[cid]
        assert m.on_demand and not h.on_demand
        assert torch.equal(m.train_y, h.train_y)
        assert m.train_x.shape == h.train_x.shape and torch.equal(m.train_x, m.train_x)
        assert m.eval_x is not None and h.eval_x is not None and m.eval_y is not None
        assert torch.equal(m.eval_y, h.eval_y) and m.eval_x.shape == h.eval_x.shape


def test_ten_thousand_clients_hold_labels_only() -> None:
    """10,000 clients of 32 1x28x28 images: built on demand, the federation allocates under
    40 MiB (measured: 28; labels, sample indices, 10,000 client objects and the 3,200-image test
    set), not the 1.0 GB the images would take; a client's images exist once it reads them."""
    cfg = _cfg(
        num_clients=10_000,
        synthetic_samples=320_000,
        synthetic_shape=[1, 28, 28],
        synthetic_classes=10,
        partition="iid",
        test_fraction=0.01,
        synthetic_on_demand=True,
    )
    began = time.perf_counter()
    tracemalloc.start()
    try:
        fed = federation.build_federation(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - began
    images = 320_000 * 28 * 28 * 4
    assert peak < 40 * 2**20, f"{peak / 2**20:.1f} MiB traced building 10,000 clients"
    assert peak < images / 25
    assert len(fed.clients) == 10_000 and seconds < 30
    client = fed.clients[1234]
    assert client.on_demand and client.num_train == 32
    x = client.train_x
    assert tuple(x.shape) == (32, 1, 28, 28) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def _params(exp: Experiment, rounds: int = 2) -> torch.Tensor:
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    for r in range(1, rounds + 1):
        result = exp.driver.fit_round(r, params, state)
        params, state = result.params, result.state
    return params


@pytest.mark.parametrize("runtime", ["inprocess", "cohort"])
def test_a_run_on_demand_is_the_run_on_the_same_data_held(runtime: str) -> None:
    """Training on features made on demand gives bit for bit the parameters of training on the
    same features held in memory (a data function returning the materialised set)."""
    sections = {"data": {"synthetic_on_demand": True}}
    if runtime == "cohort":
        sections["runtime"] = {"kind": "cohort", "cohort_size": 3, "cohort_device": "cpu"}
    cfg = config.validate(tiny_config(**sections))
    splits = federation.load_data(cfg)
    assert isinstance(splits, DatasetSplits) and isinstance(splits.train, OnDemandDataset)
    materialised = replace(splits, train=splits.train.materialise())
    on_demand = _params(Experiment(cfg))
    held = _params(Experiment(cfg, data_fn=lambda: materialised))
    assert torch.equal(on_demand, held)
    default = _params(Experiment(config.validate(tiny_config())))
    assert not torch.equal(on_demand, default)  # other draws of the noise


def test_on_demand_data_is_checked_and_refused_elsewhere() -> None:
    def bad_labels() -> DatasetSplits:
        good = _pair(True)
        assert isinstance(good.train, OnDemandDataset)
        labels = good.train.y.copy()
        labels[400] = 7
        return replace(good, train=replace(good.train, y=labels))

    with pytest.raises(ConfigError, match="the training set: label 7 is out of range"):
        federation.build_federation(config.validate(tiny_config()), bad_labels)

    def nan_rows() -> DatasetSplits:
        good = _pair(True)
        nan = OnDemandDataset(
            lambda i: np.full((len(i), 1, 6, 6), np.nan, np.float32), good.train.y, (1, 6, 6)
        )
        return replace(good, train=nan)

    with pytest.raises(ConfigError, match="NaN or infinite"):
        federation.build_federation(config.validate(tiny_config()), nan_rows)
    with pytest.raises(DataError, match="synthetic_on_demand is an option of the synthetic"):
        registry.load_dataset(
            "breast_cancer", path=None, seed=0, test_fraction=0.2, synthetic_on_demand=True
        )


def test_a_federated_data_set_may_hold_on_demand_clients() -> None:
    """A data function's natural partition may give clients on-demand training sets."""
    source = _pair(True)
    assert isinstance(source.train, OnDemandDataset)

    def sites() -> FederatedDataset:
        clients = {f"site_{k}": source.train.subset(np.arange(k, 600, 6)) for k in range(6)}
        return FederatedDataset(clients, ArrayDataset(source.test.x, source.test.y), 3)

    fed = federation.build_federation(config.validate(tiny_config()), sites)
    assert fed.client_names == [f"site_{k}" for k in range(6)]
    assert all(d.on_demand and d.num_train == 100 for d in fed.clients.values())
    np.testing.assert_array_equal(
        fed.clients[2].train_x.numpy(), source.train.rows(np.arange(2, 600, 6))
    )
