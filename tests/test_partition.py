"""Partitioners: coverage, no empty client, determinism, skew, and one-sentence errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedguard.data import medmnist, partition
from fedguard.data.errors import PartitionError

PNEUMONIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
PNEUMONIA = PNEUMONIA / "pneumoniamnist.npz"

LABELS_10 = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _check_partition(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    """Every sample in exactly one client, no client empty, sorted int64 indices."""
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)
    everything = np.concatenate(parts)
    assert len(everything) == num_samples
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_samples))


def _run(method: str, labels: np.ndarray, seed: int, **kwargs: object) -> list[np.ndarray]:
    return partition.partition(method, labels, rng=np.random.default_rng(seed), **kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.1}),
        ("dirichlet", {"alpha": 1.0}),
        ("dirichlet", {"alpha": 100.0}),
        ("shards", {"shards_per_client": 2}),
        ("shards", {"shards_per_client": 3}),
    ],
)
def test_invariants_and_determinism(method: str, kwargs: dict[str, object]) -> None:
    rng = np.random.default_rng(123)
    for seed in range(10):
        num_clients = int(rng.integers(2, 40))
        num_samples = int(rng.integers(120, 600))
        labels = rng.integers(0, 5, size=num_samples)
        parts = _run(method, labels, seed, num_clients=num_clients, **kwargs)
        _check_partition(parts, num_samples, num_clients)
        again = _run(method, labels, seed, num_clients=num_clients, **kwargs)
        for a, b in zip(parts, again, strict=True):
            np.testing.assert_array_equal(a, b)
    other = _run(method, LABELS_10, 1, num_clients=10, **kwargs)
    first = _run(method, LABELS_10, 0, num_clients=10, **kwargs)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition.iid(103, 10, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_dirichlet_small_alpha_is_skewed() -> None:
    """Mean share of each client's dominant label: about 0.6 at alpha=0.1, 0.12 at alpha=100."""

    def dominant_share(alpha: float) -> float:
        shares = []
        for seed in range(5):
            parts = partition.dirichlet(LABELS_10, 10, alpha, np.random.default_rng(seed))
            hist = np.array(partition.label_histogram(LABELS_10, parts, 10))
            shares.append((hist.max(axis=1) / hist.sum(axis=1)).mean())
        return float(np.mean(shares))

    assert dominant_share(0.1) > 0.4
    assert dominant_share(100.0) < 0.2


def test_dirichlet_fills_clients_to_min_size() -> None:
    """With alpha=0.01 most draws leave clients empty; the repair step still gives each 2."""
    labels = np.repeat(np.arange(2), 50)
    for seed in range(5):
        parts = partition.dirichlet(labels, 50, 0.01, np.random.default_rng(seed), min_size=2)
        _check_partition(parts, 100, 50)
        assert min(len(p) for p in parts) == 2


def test_shards_two_per_client_gives_at_most_two_labels() -> None:
    for seed in range(5):
        parts = partition.shards(LABELS_10, 20, 2, np.random.default_rng(seed))
        _check_partition(parts, 1000, 20)
        assert all(len(p) == 50 for p in parts)
        assert max(len(np.unique(LABELS_10[p])) for p in parts) <= 2


def test_natural_one_client_per_group_in_sorted_order() -> None:
    groups = np.array(["theo", "jackson", "theo", "nicolas", "jackson", "theo"])
    parts, names = partition.natural(groups)
    assert names == ["jackson", "nicolas", "theo"]
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2, 5]]
    via_dispatch = _run("natural", np.zeros(6, dtype=np.int64), 0, num_clients=3, groups=groups)
    assert [p.tolist() for p in via_dispatch] == [[1, 4], [3], [0, 2, 5]]
    numeric_parts, numeric_names = partition.natural(np.array([10, 2, 10]))
    assert numeric_names == ["2", "10"]
    assert [p.tolist() for p in numeric_parts] == [[1], [0, 2]]


def test_label_histogram_counts() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    assert partition.label_histogram(labels, parts, 4) == [[1, 0, 1, 0], [0, 2, 2, 0]]
    with pytest.raises(PartitionError, match="num_classes=2"):
        partition.label_histogram(labels, parts, 2)


@pytest.mark.shared_data
def test_partition_real_pneumonia_labels() -> None:
    labels = medmnist.load_medmnist(PNEUMONIA).train.y
    parts = partition.dirichlet(labels, 8, 0.5, np.random.default_rng(0))
    _check_partition(parts, 2428, 8)
    hist = partition.label_histogram(labels, parts, 2)
    assert np.sum(hist, axis=0).tolist() == [1214, 1214]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda rng: partition.iid(10, 20, rng),
            "num_clients=20 exceeds the 10 training samples: every client needs at least one",
        ),
        (lambda rng: partition.iid(10, 0, rng), "num_clients=0 is out of range"),
        (lambda rng: partition.dirichlet(LABELS_10, 5, 0.0, rng), "alpha=0.0 is out of range"),
        (lambda rng: partition.dirichlet(LABELS_10, 5, -1.0, rng), "must be > 0"),
        (
            lambda rng: partition.dirichlet(LABELS_10[:10], 6, 1.0, rng, min_size=2),
            "needs at least 12 training samples, but there are 10",
        ),
        (
            lambda rng: partition.shards(LABELS_10, 5, 0, rng),
            "shards_per_client=0 is out of range: it must be at least 1",
        ),
        (
            lambda rng: partition.shards(LABELS_10[:30], 10, 4, rng),
            "num_clients \\* shards_per_client=40 exceeds the 30 training samples",
        ),
        (
            lambda rng: partition.partition("natural", LABELS_10, num_clients=3, rng=rng),
            "groups is required for the natural partition",
        ),
        (
            lambda rng: partition.partition(
                "natural", LABELS_10[:3], num_clients=3, rng=rng, groups=np.array([1, 1, 2])
            ),
            "num_clients=3 does not match the 2 groups",
        ),
        (
            lambda rng: partition.partition("dirichlet", LABELS_10, num_clients=3, rng=rng),
            "alpha is required",
        ),
        (
            lambda rng: partition.partition("shards", LABELS_10, num_clients=3, rng=rng),
            "shards_per_client is required",
        ),
        (
            lambda rng: partition.partition("pathological", LABELS_10, num_clients=3, rng=rng),
            "choose one of iid, dirichlet, shards, natural",
        ),
    ],
)
def test_errors_are_one_sentence(
    call: Callable[[np.random.Generator], object], message: str
) -> None:
    with pytest.raises(PartitionError, match=message) as info:
        call(np.random.default_rng(0))
    text = str(info.value)
    assert text.endswith(".") and text.count(". ") == 0
