"""The robust rules' building blocks by hand: medians, the mean around the median, Krum scores,
Bulyan's selection, Gram distances and overflow-safe row distances (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.robust import gram as robust_gram

RobustnessError = robust_base.RobustnessError


def test_coordinate_median_of_even_cohorts_averages_the_two_middles() -> None:
    two = robust_coordinate.coordinate_median(torch.tensor([[1.0], [3.0]]), f=0)
    torch.testing.assert_close(two, torch.tensor([2.0]))
    assert two.dtype == torch.float32
    four = robust_coordinate.coordinate_median(torch.tensor([[1.0], [5.0], [2.0], [4.0]]), f=0)
    torch.testing.assert_close(four, torch.tensor([3.0]))
    three = robust_coordinate.coordinate_median(torch.tensor([[1.0], [5.0], [2.0]]), f=0)
    torch.testing.assert_close(three, torch.tensor([2.0]))


def test_mean_around_median_keeps_1_to_k_values() -> None:
    u = torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [9.0, -50.0]])
    # keep everything: the plain mean per coordinate
    torch.testing.assert_close(
        robust_coordinate.mean_around_median(u, keep=4), torch.tensor([3.0, -4.25])
    )
    # median 1.5 and 10.5: the single closest value is tied (1, 2) and (10, 11): averaged
    torch.testing.assert_close(
        robust_coordinate.mean_around_median(u, keep=1), torch.tensor([1.5, 10.5])
    )
    torch.testing.assert_close(
        robust_coordinate.mean_around_median(u, keep=3), torch.tensor([1.0, 11.0])
    )
    for keep in (0, 5):
        with pytest.raises(RobustnessError, match="Cannot keep"):
            robust_coordinate.mean_around_median(u, keep=keep)


def test_the_kept_values_are_summed_in_float64() -> None:
    """float32 sums would lose the small kept values next to large ones of opposite sign:
    2^25 + 1 is 2^25 in float32 (its spacing there is 4)."""
    big = 2.0**25
    # median 1; the five values closest to it are 2^25, 1, 1, -2^25 and the tied pair
    # -2^26, 2^26 (distance 2^26 - 1 and 2^26 + 1, both 2^26 in float32) sharing one place:
    # (2^25 + 1 + 1 - 2^25 + (2^26 - 2^26) / 2) / 5 = 0.4, not 0
    column = torch.tensor([[big], [1.0], [1.0], [-big], [2.0**26], [-(2.0**26)]])
    got = robust_coordinate.mean_around_median(column, keep=5)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.4, rel=1e-6)
    # median 1; five values inside and three tied at float32 distance 2^25 (-(2^25 - 2), 2^25,
    # 2^25) fill the three places left: (5 + 2^25 + 2) / 8 = 4194304.875, 4194305 in float32;
    # a float32 tied sum (2^25 + 2 is 2^25 there) would give 4194304.5
    rows = [-(2.0**28), -(big - 2), 0.5, 0.75, 1.0, 1.25, 1.5, big, big]
    got = robust_coordinate.mean_around_median(torch.tensor(rows).unsqueeze(1), keep=8)
    assert got.item() == 4194305.0
    # f = 1: -2^30 and 2^30 are trimmed, -3e8 and 3e8 are the kept extremes; the values strictly
    # between them sum to 2^25 + 1 + 1 - 2^25 = 2: mean 2 / 6
    rows = [-(2.0**30), -3e8, big, 1.0, 1.0, -big, 3e8, 2.0**30]
    got = robust_coordinate.trimmed_mean(torch.tensor(rows).unsqueeze(1), f=1)
    assert got.item() == pytest.approx(1 / 3, rel=1e-6)


def test_the_kept_copies_of_the_extremes_are_counted_in_float64() -> None:
    """Three copies each of -(2^24 + 2) and 2^24 + 2 kept: 3 (2^24 + 2) = 50331654 is not a
    float32 (spacing 4 there), so a float32 product would leave 2 of the exact 0 behind."""
    v = 2.0**24 + 2
    rows = [-(2.0**26), -v, -v, -v, v, v, v, 2.0**26]
    got = robust_coordinate.trimmed_mean(torch.tensor(rows).unsqueeze(1), f=1)
    assert got.item() == 0.0


def test_krum_scores_take_0_to_k_minus_1_neighbours() -> None:
    d = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 9.0], [4.0, 9.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        robust_distance.krum_scores(d, neighbours=0), torch.zeros(3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        robust_distance.krum_scores(d, neighbours=1),
        torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        robust_distance.krum_scores(d, neighbours=2),
        torch.tensor([5.0, 10.0, 13.0], dtype=torch.float64),
    )
    for n in (-1, 3):
        with pytest.raises(RobustnessError, match="neighbours"):
            robust_distance.krum_scores(d, neighbours=n)


def test_bulyan_selection_without_byzantine_clients_takes_every_row() -> None:
    d = robust_gram.pairwise_sq_distances(torch.tensor([[0.0], [1.0], [3.0]]))
    picked = robust_distance.bulyan_selection(d, f=0)
    assert sorted(picked) == [0, 1, 2] and all(isinstance(i, int) for i in picked)
    # f = 1, K = 7: theta = 5 rows picked, never the two far ones
    pts = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4], [50.0], [-60.0]])
    chosen = robust_distance.bulyan_selection(robust_gram.pairwise_sq_distances(pts), f=1)
    assert len(chosen) == 5 and sorted(chosen) == [0, 1, 2, 3, 4]


def test_distances_below_one_are_not_clamped() -> None:
    d = robust_gram.pairwise_sq_distances(torch.tensor([[0.0, 0.0], [0.3, 0.4], [0.0, 0.1]]))
    expected = torch.tensor(
        [[0.0, 0.25, 0.01], [0.25, 0.0, 0.18], [0.01, 0.18, 0.0]], dtype=d.dtype
    )
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-7)


def test_row_sq_distances_across_blocks_and_past_float32_overflow() -> None:
    wide = torch.zeros(2, robust_base.CHUNK + 3)
    wide[0, 0], wide[0, -1], wide[1, 5], wide[1, -2] = 3.0, 4.0, 1.0, 2.0
    out = robust_base.row_sq_distances(wide, torch.zeros(robust_base.CHUNK + 3))
    torch.testing.assert_close(out, torch.tensor([25.0, 5.0], dtype=torch.float64))
    huge = torch.tensor([[3e38, 3e38], [3e38, -3e38], [1.0, 1.0]])
    point = torch.tensor([1e38, 0.0])
    got = robust_base.row_sq_distances(huge, point)
    rows = huge.double() - point.double()
    torch.testing.assert_close(got, (rows * rows).sum(dim=1), rtol=1e-6, atol=0)
    assert got.dtype == torch.float64 and bool(torch.isfinite(got).all())
