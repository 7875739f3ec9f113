"""The robust rules' configuration, dispatch and the geometric median's iterations, pinned with
hand-written references (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms import robust, seeding
from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import bucketing as robust_bucketing
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.robust import gram as robust_gram
from fedguard.algorithms.robust import iterative as robust_iterative
from fedguard.algorithms.robust.base import RobustnessError

K = robust.RobustAggregator

# five small updates (every distance below 1, where nu and a clamp at 1 would matter) and one
# far outlier, with unequal weights
UPDATES = torch.tensor(
    [
        [0.10, 0.20, 0.30],
        [0.14, 0.17, 0.26],
        [0.07, 0.25, 0.33],
        [0.12, 0.22, 0.21],
        [0.95, -0.85, 0.75],
    ]
)
WEIGHTS = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0])


# --- configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nu": 0.0},
        {"nu": -1e-6},
        {"tolerance": 0.0},
        {"max_iterations": 0},
        {"tau": 0.0},
        {"clipping_iterations": 0},
        {"norm_bound": 0.0},
        {"multi_krum_m": 0},
    ],
)
def test_each_bad_setting_alone_is_refused(kwargs) -> None:
    with pytest.raises(RobustnessError):
        robust.RobustConfig(K.GEOMETRIC_MEDIAN, **kwargs)


def test_the_smallest_good_settings_are_accepted() -> None:
    config = robust.RobustConfig(
        K.MULTI_KRUM, multi_krum_m=1, max_iterations=1, clipping_iterations=1, norm_bound=0.5
    )
    assert (config.multi_krum_m, config.max_iterations, config.norm_bound) == (1, 1, 0.5)


def test_check_f_and_check_updates_and_weights_at_their_edges() -> None:
    for bad in (True, 2.5, "3", -1):
        with pytest.raises(RobustnessError, match="integer >= 0"):
            robust_base.check_f(bad)
    robust_base.check_f(0)
    with pytest.raises(RobustnessError, match="empty matrix"):
        robust_base.check_updates(torch.zeros(0, 3))
    robust_base.check_updates(torch.zeros(1, 3))  # one update is a matrix too
    for bad in ([2.0, -1.0], [float("inf"), 1.0], [float("nan"), 1.0], [0.0, 0.0]):
        with pytest.raises(RobustnessError, match="finite, non-negative, with a positive sum"):
            robust_base.normalised_weights(torch.tensor(bad), 2)
    half = robust_base.normalised_weights(torch.tensor([0.125, 0.375]), 2)
    assert half.tolist() == [0.25, 0.75] and half.dtype == torch.float64


def test_stateless_rules_start_with_an_empty_reference() -> None:
    for kind in (K.MEDIAN, K.KRUM, K.GEOMETRIC_MEDIAN):
        state = robust.init(robust.RobustConfig(kind), 7)
        assert state.reference.shape == (0,) and state.reference.dtype == torch.float32
    clipping = robust.init(robust.RobustConfig(K.CENTERED_CLIPPING), 7)
    assert clipping.reference.shape == (7,) and not clipping.reference.any()


# --- dispatch: every setting reaches its rule


def _apply(config: robust.RobustConfig, updates=UPDATES, weights=WEIGHTS, **kw):
    return robust.apply(config, robust.init(config, updates.shape[1]), updates, weights, **kw)[1]


def test_multi_krum_averages_m_updates_default_k_minus_f() -> None:
    updates = torch.cat([UPDATES, UPDATES[:3] + 0.01])  # 8 updates of dimension 3
    weights = torch.arange(1.0, 9.0) * 1.5
    default = _apply(robust.RobustConfig(K.MULTI_KRUM, f=1), updates, weights)
    assert torch.equal(default, robust_distance.multi_krum(updates, weights, f=1, m=7))
    two = _apply(robust.RobustConfig(K.MULTI_KRUM, f=1, multi_krum_m=2), updates, weights)
    assert torch.equal(two, robust_distance.multi_krum(updates, weights, f=1, m=2))
    assert not torch.equal(two, default)


def test_the_geometric_median_gets_its_settings() -> None:
    def gm(**kw):
        return robust_iterative.geometric_median(UPDATES, WEIGHTS, f=1, **kw).aggregate

    for kw in ({"nu": 0.5}, {"max_iterations": 2}, {"tolerance": 0.2}):
        got = _apply(robust.RobustConfig(K.GEOMETRIC_MEDIAN, f=1, **kw))
        assert torch.equal(got, gm(**kw)) and not torch.equal(got, gm()), kw


def test_centered_clipping_gets_its_iterations() -> None:
    reference = torch.tensor([0.5, 0.5, 0.5])
    config = robust.RobustConfig(K.CENTERED_CLIPPING, f=1, tau=0.3, clipping_iterations=3)
    state, out = robust.apply(config, robust.RobustState(reference), UPDATES, WEIGHTS)

    def cc(iterations: int) -> torch.Tensor:
        return robust_iterative.centered_clipping(
            UPDATES, WEIGHTS, f=1, reference=reference, tau=0.3, iterations=iterations
        )

    assert torch.equal(out, cc(3)) and torch.equal(state.reference, out)
    assert not torch.equal(out, cc(1))


def test_buckets_are_shuffled_by_the_run_seed_and_round() -> None:
    updates = torch.cat([UPDATES, UPDATES + 0.05, UPDATES * 2])  # 15 updates
    weights = torch.arange(1.0, 16.0)
    config = robust.RobustConfig(K.MEDIAN, f=1, bucket_size=2, seed=5)

    def reference(round_: int) -> torch.Tensor:
        shuffle = seeding.generator(5, round_, robust.BUCKET_STREAM)
        means, _ = robust_bucketing.bucket_means(updates, weights, 2, shuffle)
        return robust_coordinate.coordinate_median(means, f=1)

    assert robust.BUCKET_STREAM == 0xB0C7
    assert torch.equal(_apply(config, updates, weights, round_=3), reference(3))
    assert torch.equal(_apply(config, updates, weights), reference(0))  # round 0 by default
    assert not torch.equal(reference(3), reference(0))


# --- the centred Gram matrix


def test_the_gram_matrix_is_centred_at_the_lower_median_norm_row() -> None:
    four = torch.tensor([[4.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 2.0]])  # norms 4, 1, 3, 2
    assert robust_gram.centered_gram(four).center == 3  # norm 2, the lower of 2 and 3
    five = torch.tensor([[5.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 2.0], [4.0, 0.0]])
    got = robust_gram.centered_gram(five)
    assert got.center == 2  # norm 3
    b = five.double() - five[2].double()
    assert torch.equal(got.gram, b @ b.T)


def test_tied_norms_centre_the_gram_matrix_at_the_lower_median_index() -> None:
    """Ties in the norms are broken by row index (a stable sort), so the centre does not depend on
    the sort algorithm: 17 unit rows, the lower median of indices 0..16 is row 8 (an unstable CPU
    sort of 17 equal keys puts row 9 there)."""
    axes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    updates = axes.repeat(5, 1)[:17]
    got = robust_gram.centered_gram(updates)
    assert got.center == 8
    b = updates.double() - updates[8].double()
    assert torch.equal(got.gram, b @ b.T)


def test_the_gram_matrix_adds_every_column_block() -> None:
    d = robust_base.CHUNK + 5
    g = torch.Generator().manual_seed(1)
    updates = torch.randn(3, d, generator=g)
    got = robust_gram.centered_gram(updates)
    b = updates.double() - updates[got.center].double()
    assert float((got.gram - b @ b.T).abs().max()) < 1e-6 * float((b @ b.T).abs().max())


def test_an_overflowing_gram_matrix_keeps_rows_close_to_the_centre() -> None:
    """A float32 update near 3e38 overflows the plain Gram matrix; the scaled recomputation
    keeps every entry, also those of a row within distance 1 of the centre."""
    updates = torch.tensor([[0.5, 0.0], [0.2, 0.3], [3e38, 0.0]])  # norms 0.5, 0.36, 3e38
    got = robust_gram.centered_gram(updates)
    assert got.center == 0
    b = updates.double() - updates[0].double()
    reference = b @ b.T
    assert bool(torch.isfinite(got.gram).all())
    assert got.gram[1, 2].item() == pytest.approx(reference[1, 2].item(), rel=1e-6)
    assert got.gram[1, 1].item() == pytest.approx(reference[1, 1].item(), rel=1e-6)


# --- the geometric median against a hand-written Weiszfeld loop


def _weiszfeld(iterations: int, nu: float = 1e-6) -> torch.Tensor:
    u = UPDATES.double()
    a = WEIGHTS.double() / WEIGHTS.double().sum()
    v = a @ u
    for _ in range(iterations):
        beta = a / (u - v).norm(dim=1).clamp_min(nu)
        v = beta @ u / beta.sum()
    return v


def test_weiszfeld_iterations_by_hand() -> None:
    for n in (1, 2, 5):
        got = robust_iterative.geometric_median(
            UPDATES, WEIGHTS, f=1, max_iterations=n, tolerance=1e-12
        )
        assert (got.iterations, got.converged) == (n, False)
        assert float((got.aggregate.double() - _weiszfeld(n)).abs().max()) < 1e-6, n
    smooth = robust_iterative.geometric_median(
        UPDATES, WEIGHTS, f=1, nu=0.5, max_iterations=3, tolerance=1e-12
    )
    assert float((smooth.aggregate.double() - _weiszfeld(3, nu=0.5)).abs().max()) < 1e-6


def test_the_default_smoothing_is_nu_1e_6() -> None:
    default = robust_iterative.geometric_median(UPDATES, WEIGHTS, f=1)
    explicit = robust_iterative.geometric_median(
        UPDATES, WEIGHTS, f=1, nu=1e-6, max_iterations=1000, tolerance=1e-6
    )
    assert torch.equal(default.aggregate, explicit.aggregate)
    assert default.iterations == explicit.iterations and default.converged


def test_weiszfeld_stops_when_the_step_is_small_against_the_median_distance() -> None:
    """The iteration count of the hand loop with the documented rule: stop after the first
    step of length <= tolerance times the median distance to the new point."""
    u = UPDATES.double()
    a = WEIGHTS.double() / WEIGHTS.double().sum()
    v = a @ u
    iterations = 0
    ratio = float("inf")
    while ratio > 1:
        iterations += 1
        beta = a / (u - v).norm(dim=1).clamp_min(1e-6)
        new = beta @ u / beta.sum()
        ratio = float((new - v).norm()) / (1e-3 * float((u - new).norm(dim=1).median()))
        v = new
    assert ratio < 0.99  # not a borderline stop
    got = robust_iterative.geometric_median(UPDATES, WEIGHTS, f=1, tolerance=1e-3)
    assert (got.iterations, got.converged) == (iterations, True)
    assert iterations > 2


def test_identical_updates_converge_at_the_first_iteration() -> None:
    same = UPDATES[:1].repeat(4, 1)
    got = robust_iterative.geometric_median(same, WEIGHTS[:4], f=1)
    assert (got.iterations, got.converged) == (1, True)
    assert torch.equal(got.aggregate, UPDATES[0])


def test_geometric_median_settings_at_their_edges() -> None:
    for kw in ({"nu": 0.0}, {"max_iterations": 0}, {"tolerance": 0.0}):
        with pytest.raises(RobustnessError):
            robust_iterative.geometric_median(UPDATES, WEIGHTS, f=1, **kw)
    one = robust_iterative.geometric_median(UPDATES, WEIGHTS, f=1, max_iterations=1)
    assert one.iterations == 1


def _naive_bulyan_selection(points: list[float], f: int, spare: int = 2) -> list[int]:
    """Bulyan's repeated Krum on 1-D points by hand: each pick is the remaining point with the
    least sum of squared distances to its ``len(remaining) - f - spare`` nearest others (at
    least 1), ties broken by the sum over all remaining points."""
    remaining, selected = list(range(len(points))), []
    for _ in range(len(points) - 2 * f):
        if len(remaining) == 1:
            selected.append(remaining.pop())
            break
        near = max(len(remaining) - f - spare, 1)

        def key(i: int, near: int = near) -> tuple[float, float]:
            sq = sorted((points[i] - points[j]) ** 2 for j in remaining if j != i)
            return sum(sq[:near]), sum(sq)

        best = min(remaining, key=key)
        remaining.remove(best)
        selected.append(best)
    return selected


def test_bulyan_picks_by_krum_over_k_minus_f_minus_2_neighbours() -> None:
    points = [4.96, 7.68, 0.88, 1.32, 3.07, 6.34, 4.9]
    sq = torch.tensor([[(a - b) ** 2 for b in points] for a in points], dtype=torch.float64)
    expected = _naive_bulyan_selection(points, 1)
    assert robust_distance.bulyan_selection(sq, f=1) == expected == [0, 4, 5, 3, 6]
    assert _naive_bulyan_selection(points, 1, spare=3)[0] != expected[0]  # the count matters
