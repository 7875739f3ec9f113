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
