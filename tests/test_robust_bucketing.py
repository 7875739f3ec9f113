"""Bucketing: bucket means by hand, exact totals, the f condition on buckets, and its point on
heterogeneous honest updates."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms import robust
from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import bucketing as robust_bucketing
from fedguard.experiment.config import validate

GEN = torch.Generator


def test_bucket_means_are_weighted_means_of_their_members() -> None:
    updates = torch.arange(15, dtype=torch.float64).view(5, 3)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64)
    means, mass = robust_bucketing.bucket_means(updates, weights, 2, GEN().manual_seed(0))
    order = torch.randperm(5, generator=GEN().manual_seed(0))  # the same draw
    assert means.shape == (3, 3) and mass.shape == (3,)
    for b, rows in enumerate(order.split(2)):
        w = weights[rows]
        expected = (w @ updates[rows]) / w.sum() if w.sum() > 0 else updates[rows].mean(0)
        assert torch.allclose(means[b], expected, atol=1e-12)
        assert mass[b] == w.sum()
    # Mass times mean adds back to the weighted sum of all updates.
    assert torch.allclose(mass @ means, weights @ updates, atol=1e-9)


def test_zero_weight_bucket_takes_the_plain_mean() -> None:
    updates = torch.tensor(
        [[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [20.0, 20.0]], dtype=torch.float64
    )
    weights = torch.tensor([0.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    for seed in range(50):  # a shuffle that puts the two zero-weight rows in one bucket
        if set(torch.randperm(4, generator=GEN().manual_seed(seed))[:2].tolist()) == {0, 1}:
            break
    else:
        pytest.fail("no shuffle grouped rows 0 and 1")
    means, mass = robust_bucketing.bucket_means(updates, weights, 2, GEN().manual_seed(seed))
    assert torch.allclose(means[0], torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(means[1], torch.tensor([17.5, 17.5], dtype=torch.float64))
    assert mass.tolist() == [0.0, 4.0]


def test_size_one_is_a_permutation_and_bad_sizes_are_refused() -> None:
    updates = torch.randn(6, 4, generator=GEN().manual_seed(2))
    means, mass = robust_bucketing.bucket_means(updates, torch.ones(6), 1, GEN().manual_seed(3))
    assert sorted(map(tuple, means.tolist())) == sorted(map(tuple, updates.tolist()))
    assert mass.tolist() == [1.0] * 6
    for size in (0, -2, 1.5, True):
        with pytest.raises(robust_base.RobustnessError, match="bucket size"):
            robust_bucketing.bucket_means(updates, torch.ones(6), size, GEN())
    with pytest.raises(robust_base.RobustnessError, match="Norm bounding"):
        robust.RobustConfig(
            robust.RobustAggregator.NORM_BOUNDING, f=1, norm_bound=1.0, bucket_size=2
        )


def test_f_condition_counts_buckets() -> None:
    kind = robust.RobustAggregator
    assert robust.max_byzantine(kind.MEDIAN, 20, 2) == 4  # 10 buckets: f < 5
    assert robust.max_byzantine(kind.KRUM, 20, 2) == 3  # 10 > 2f + 2
    assert robust.max_byzantine(kind.MEDIAN, 21, 2) == 5  # 11 buckets, the last of one update
    cfg = robust.RobustConfig(kind.MEDIAN, f=5, bucket_size=2)
    updates = torch.randn(20, 3, generator=GEN().manual_seed(4))
    with pytest.raises(robust_base.RobustnessError, match="K > 2f"):
        robust.apply(cfg, robust.init(cfg, 3), updates, torch.ones(20))


def test_the_round_picks_the_shuffle_and_the_same_round_repeats_it() -> None:
    cfg = robust.RobustConfig(robust.RobustAggregator.MEDIAN, f=1, bucket_size=2, seed=7)
    updates = torch.randn(8, 50, generator=GEN().manual_seed(5))
    state = robust.init(cfg, 50)
    first = robust.apply(cfg, state, updates, torch.ones(8), round_=3)[1]
    again = robust.apply(cfg, state, updates, torch.ones(8), round_=3)[1]
    other = robust.apply(cfg, state, updates, torch.ones(8), round_=4)[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_buckets_bring_the_median_of_skewed_honest_updates_near_their_mean() -> None:
    """Non-IID honest clients whose coordinates are skewed (exponential: mean 1, median ln 2): the
    coordinate median of 20 updates is biased by about 0.31 per coordinate; on 10 bucket means of
    2 (Gamma(2) / 2: median 0.84) the bias nearly halves, in every round's shuffle."""
    g = GEN().manual_seed(6)
    updates = torch.empty(20, 2000, dtype=torch.float64).exponential_(generator=g)
    target = updates.mean(0)
    errors = {}
    for size in (1, 2):
        cfg = robust.RobustConfig(robust.RobustAggregator.MEDIAN, f=4, bucket_size=size)
        state = robust.init(cfg, 2000)
        errors[size] = [
            float((robust.apply(cfg, state, updates, torch.ones(20), round_=r)[1] - target).mean())
            for r in range(5)
        ]
    assert all(-0.36 < e < -0.26 for e in errors[1])
    assert all(-0.22 < e < -0.10 for e in errors[2])


def test_config_checks_the_condition_on_bucket_means() -> None:
    base = {
        "data": {"dataset": "synthetic", "num_clients": 20},
        "server": {"clients_per_round": 20, "aggregator": "krum", "byzantine_f": 4},
    }
    validate(base)
    base["server"]["bucket_size"] = 2
    with pytest.raises(ValueError, match="bucket means"):
        validate(base)
    base["server"] |= {"aggregator": "median"}
    assert validate(base).server.bucket_size == 2
    with pytest.raises(ValueError, match="bucket_size only applies"):
        validate({**base, "server": {**base["server"], "aggregator": "mean", "byzantine_f": None}})
