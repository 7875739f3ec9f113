"""Byzantine-robust aggregators: one shared suite over every rule, then numbers checked by hand."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms import robust
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.robust import gram as robust_gram
from fedguard.algorithms.robust import iterative as robust_iterative

KINDS = list(robust.RobustAggregator)
K, D, F = 11, 5, 2  # K = 4f + 3: the smallest cohort every rule accepts with f = 2


def config(kind: robust.RobustAggregator, f: int = F) -> robust.RobustConfig:
    return robust.RobustConfig(kind, f=f, norm_bound=3.0)


def run(
    kind: robust.RobustAggregator, updates: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    cfg = config(kind)
    return robust.apply(cfg, robust.init(cfg, updates.shape[1]), updates, weights)[1]


def honest(seed: int = 0, rows: int = K - F) -> torch.Tensor:
    return torch.randn(rows, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- the shared suite (every rule) -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_permutation_invariant(kind: robust.RobustAggregator) -> None:
    updates = honest(1, K)
    weights = torch.rand(K, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    order = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    expected = run(kind, updates, weights)
    assert torch.allclose(run(kind, updates[order], weights[order]), expected, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_updates_give_their_weighted_mean(kind: robust.RobustAggregator) -> None:
    row = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25], dtype=torch.float64)  # norm < bound 3
    updates = row.repeat(K, 1)
    weights = torch.arange(1.0, K + 1.0, dtype=torch.float64)
    assert torch.allclose(run(kind, updates, weights), row, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("value", "dtype"), [(1e6, torch.float64), (-1e6, torch.float64), (3e38, torch.float32)]
)
def test_f_huge_rows_stay_within_the_honest_radius(
    kind: robust.RobustAggregator, value: float, dtype: torch.dtype
) -> None:
    # The plain mean would land ~ 2/11 * value away; every rule must stay within the largest
    # distance of an honest update to the honest mean.
    for seed in range(3):
        good = honest(seed)
        radius = float((good - good.mean(0)).norm(dim=1).max())
        updates = torch.cat([good, torch.full((F, D), value, dtype=torch.float64)]).to(dtype)
        out = run(kind, updates, torch.ones(K, dtype=dtype))
        assert out.dtype == dtype
        assert float((out.double() - good.mean(0)).norm()) <= radius


@pytest.mark.parametrize("kind", KINDS)
def test_refuses_more_byzantine_clients_than_tolerated(kind: robust.RobustAggregator) -> None:
    f_max = robust.max_byzantine(kind, K)
    updates, weights = honest(4, K), torch.ones(K, dtype=torch.float64)
    cfg = config(kind, f_max)
    robust.apply(cfg, robust.init(cfg, D), updates, weights)  # accepted
    condition = {
        robust.RobustAggregator.KRUM: "Krum needs K > 2f + 2",
        robust.RobustAggregator.MULTI_KRUM: "Multi-Krum needs K > 2f + 2",
        robust.RobustAggregator.BULYAN: "Bulyan needs K >= 4f + 3",
        robust.RobustAggregator.MEDIAN: "The coordinate-wise median needs K > 2f",
        robust.RobustAggregator.TRIMMED_MEAN: "The trimmed mean needs K > 2f",
        robust.RobustAggregator.GEOMETRIC_MEDIAN: "The geometric median needs K > 2f",
        robust.RobustAggregator.CENTERED_CLIPPING: "Centered clipping needs K > 2f",
        robust.RobustAggregator.NORM_BOUNDING: "Norm bounding needs K > 2f",
    }[kind]
    message = f"{condition} updates; got K={K} with f={f_max + 1}."
    cfg = config(kind, f_max + 1)
    with pytest.raises(robust_base.RobustnessError, match=message.replace("+", r"\+")):
        robust.apply(cfg, robust.init(cfg, D), updates, weights)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_modified(kind: robust.RobustAggregator) -> None:
    updates, weights = honest(5, K), torch.ones(K, dtype=torch.float64)
    before = updates.clone()
    out = run(kind, updates, weights)
    out += 1.0  # the result is not a view of the input either
    assert torch.equal(updates, before)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_rows_are_refused(kind: robust.RobustAggregator) -> None:
    updates = honest(6, K)
    updates[3, 1] = float("nan")
    with pytest.raises(robust_base.RobustnessError, match=r"Update rows \[3\] contain NaN"):
        run(kind, updates, torch.ones(K, dtype=torch.float64))


def test_max_byzantine_and_secure_aggregation_predicate() -> None:
    assert robust.max_byzantine(robust.RobustAggregator.KRUM, 7) == 2  # 7 > 2*2 + 2
    assert robust.max_byzantine(robust.RobustAggregator.BULYAN, 11) == 2  # 11 >= 4*2 + 3
    assert robust.max_byzantine(robust.RobustAggregator.MEDIAN, 10) == 4  # 10 > 2*4
    assert [k for k in KINDS if not robust.needs_individual_updates(k)] == [
        robust.RobustAggregator.NORM_BOUNDING
    ]
    with pytest.raises(robust_base.RobustnessError, match="Norm bounding needs a norm_bound"):
        robust.RobustConfig(robust.RobustAggregator.NORM_BOUNDING)


# ---- numbers by hand ---------------------------------------------------------------------------


def test_median_by_hand() -> None:
    assert (
        robust_coordinate.coordinate_median(torch.tensor([[1.0], [2.0], [100.0]]), f=1).item()
        == 2.0
    )
    four = torch.tensor([[1.0, 0.0], [2.0, 7.0], [3.0, 8.0], [100.0, 9.0]])
    assert robust_coordinate.coordinate_median(four, f=1).tolist() == [2.5, 7.5]
    ties = torch.tensor([[1.0, 2.0], [2.0, 2.0], [2.0, 2.0], [5.0, 1.0]])
    assert robust_coordinate.coordinate_median(ties, f=1).tolist() == [2.0, 2.0]
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 3, (10, 300), generator=g).to(torch.float64)
    expected = x.sort(dim=0).values[4:6].mean(dim=0)
    assert torch.equal(robust_coordinate.coordinate_median(x, f=4), expected)


def test_trimmed_mean_by_hand_and_with_ties() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert robust_coordinate.trimmed_mean(x, f=1).item() == 3.0  # (2 + 3 + 4) / 3
    ties = torch.tensor([[1.0], [1.0], [1.0], [5.0], [5.0]])
    assert robust_coordinate.trimmed_mean(ties, f=1).item() == pytest.approx(7.0 / 3.0)  # 1, 1, 5
    same = torch.full((5, 1), 4.0)
    assert robust_coordinate.trimmed_mean(same, f=2).item() == 4.0


def test_trimmed_mean_equals_sorting_on_integer_data_full_of_ties() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 4, (9, 400), generator=g).to(torch.float64)
    for f in range(5):
        expected = x.sort(dim=0).values[f : 9 - f].mean(dim=0)
        assert torch.allclose(robust_coordinate.trimmed_mean(x, f=f), expected, atol=1e-12)


def test_krum_picks_the_row_computed_by_hand() -> None:
    # f = 1, K - f - 2 = 2 neighbours. Squared distances:
    #   a=(0,0): b 9, c 9, d 200, e 2 -> 2 + 9 = 11
    #   b=(3,0): a 9, c 18, d 149, e 5 -> 5 + 9 = 14
    #   c=(0,3): a 9, b 18, d 149, e 5 -> 14
    #   d=(10,10): 149, 149, 162, 200 -> 298
    #   e=(1,1): a 2, b 5, c 5, d 162 -> 2 + 5 = 7   <- Krum
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [10.0, 10.0], [1.0, 1.0]])
    scores = robust_distance.krum_scores(robust_gram.pairwise_sq_distances(x), neighbours=2)
    assert scores.tolist() == pytest.approx([11.0, 14.0, 14.0, 298.0, 7.0])
    assert robust_distance.krum(x, f=1).tolist() == [1.0, 1.0]
    # Multi-Krum, m = 2: the mean of e and a
    assert robust_distance.multi_krum(x, torch.ones(5), f=1, m=2).tolist() == [0.5, 0.5]


def test_mean_around_median_by_hand() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [10.0], [11.0]])  # median 3; closest three: 3, 2, 1
    assert robust_coordinate.mean_around_median(x, keep=3).item() == 2.0
    # median 2, keep 2: 2 itself, then 1 and 3 tie at distance 1 and share the last place
    tied = torch.tensor([[0.0], [1.0], [2.0], [3.0], [9.0]])
    assert robust_coordinate.mean_around_median(tied, keep=2).item() == 2.0


def test_bulyan_selection_and_second_step() -> None:
    good = honest(8)
    apart = torch.cat([good, torch.tensor([[1e6] * D, [-1e6] * D], dtype=torch.float64)])
    chosen = robust_distance.bulyan_selection(robust_gram.pairwise_sq_distances(apart), f=F)
    assert len(chosen) == K - 2 * F and max(chosen) < K - F  # lone outliers are never picked
    expected = robust_coordinate.mean_around_median(apart[chosen], keep=K - 4 * F)
    assert torch.equal(robust_distance.bulyan(apart, f=F), expected)
    # Two colluding identical outliers are each other's nearest neighbour: when one neighbour is
    # left in the score (n - f - 2 = 1) one of them can be selected, as in the paper; the second
    # step then has to absorb at most f of them.
    twins = torch.cat([good, torch.full((F, D), 1e6, dtype=torch.float64)])
    chosen = robust_distance.bulyan_selection(robust_gram.pairwise_sq_distances(twins), f=F)
    assert len(chosen) == K - 2 * F and sum(i >= K - F for i in chosen) <= F


def test_geometric_median_of_symmetric_points_is_the_centre() -> None:
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    result = robust_iterative.geometric_median(square + 5.0, torch.ones(4), f=1)
    assert result.converged
    assert result.aggregate.tolist() == pytest.approx([5.0, 5.0], abs=1e-9)
    # on a line the geometric median is the median: 1, not the mean 11/3
    line = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    assert robust_iterative.geometric_median(line, torch.ones(3), f=1).aggregate.item() == (
        pytest.approx(1.0, abs=1e-4)
    )


def test_centered_clipping_by_hand_and_with_a_large_radius() -> None:
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    # tau = 1 around 0: (3, 0) -> (1, 0), (0, 4) -> (0, 1); one step: their mean
    out = robust_iterative.centered_clipping(x, torch.ones(2), f=0, reference=zero, tau=1.0)
    assert out.tolist() == [0.5, 0.5]
    w = torch.tensor([1.0, 3.0])
    big = robust_iterative.centered_clipping(x, w, f=0, reference=zero, tau=1e9)
    assert big.tolist() == pytest.approx([0.75, 3.0])  # the weighted mean


def test_centered_clipping_state_is_the_previous_aggregate() -> None:
    cfg = robust.RobustConfig(robust.RobustAggregator.CENTERED_CLIPPING, f=1, tau=0.5)
    state = robust.init(cfg, D)
    updates, weights = honest(9, K), torch.ones(K, dtype=torch.float64)
    state, first = robust.apply(cfg, state, updates, weights)
    assert torch.equal(state.reference, first)
    _, second = robust.apply(cfg, state, updates, weights)
    expected = robust_iterative.centered_clipping(updates, weights, f=1, reference=first, tau=0.5)
    assert torch.equal(second, expected) and not torch.equal(second, first)


def test_norm_bounding_by_hand_and_same_clip_as_dp_fedavg() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    out = robust_iterative.norm_bounding(x, torch.ones(2), f=0, bound=1.0)
    assert out.tolist() == pytest.approx([0.3, 0.9])  # ((0.6, 0.8) + (0, 1)) / 2
    updates = honest(10, K) * 3.0
    weights = torch.rand(K, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    clipped = torch.stack([dp_fedavg.clip_update(u, 2.0).update for u in updates])
    expected = (weights / weights.sum()) @ clipped
    out = robust_iterative.norm_bounding(updates, weights, f=0, bound=2.0)
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize(
    ("outlier", "tolerance"),
    [(1e6, 1e-5), (-3e38, 1e-4)],  # -3e38 overflows the float32 product: scaled rows instead
)
def test_pairwise_distances_match_direct_differences_despite_outliers(
    outlier: float, tolerance: float
) -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(20, 50_000, generator=g) + 100.0  # a shared offset: cancellation bait
    x[0] = 1e6
    x[1] = outlier
    got = robust_gram.pairwise_sq_distances(x)
    exact = torch.cdist(x.double(), x.double()) ** 2
    honest_pairs = (slice(2, None), slice(2, None))
    rel = (got - exact).abs()[honest_pairs] / exact[honest_pairs].fill_diagonal_(1.0)
    assert float(rel.max()) < tolerance
    assert float(((got - exact).abs() / exact.clamp_min(1.0))[:2, 2:].max()) < tolerance
