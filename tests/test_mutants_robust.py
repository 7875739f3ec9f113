"""Robust rules at their edges, with hand-computed numbers (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.robust import iterative as robust_iterative

RobustnessError = robust_base.RobustnessError


def test_row_norms_of_a_single_update() -> None:
    out = robust_base.row_norms(torch.tensor([[3.0, 4.0]]))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([5.0], dtype=torch.float64))


def test_krum_needs_more_than_2f_plus_2_updates_and_scores_k_minus_f_minus_2_neighbours() -> None:
    with pytest.raises(RobustnessError, match="K > 2f \\+ 2"):
        robust_distance.krum(torch.zeros(4, 1), f=1)
    # f = 1, K = 5: two neighbours each. 6.1's two nearest (5.4, 7.3) are closer than those of
    # 9.1 (9.4, 7.3): squared sums 0.49 + 1.44 = 1.93 against 0.09 + 3.24 = 3.33; with one
    # neighbour 9.1 and 9.4 (0.09) would win instead
    points = torch.tensor([[9.1], [6.1], [7.3], [5.4], [9.4]])
    torch.testing.assert_close(robust_distance.krum(points, f=1), torch.tensor([6.1]))


def test_multi_krum_takes_m_from_1_to_k_and_refuses_zero_weight_selections() -> None:
    points = torch.tensor([[9.1], [6.1], [7.3], [5.4], [9.4]])
    ones = torch.ones(5)
    torch.testing.assert_close(
        robust_distance.multi_krum(points, ones, f=1, m=1), torch.tensor([6.1])
    )
    everyone = robust_distance.multi_krum(points, torch.tensor([1.0, 1, 1, 1, 4]), f=1, m=5)
    torch.testing.assert_close(everyone, torch.tensor([(9.1 + 6.1 + 7.3 + 5.4 + 4 * 9.4) / 8]))
    for m in (0, 6):
        with pytest.raises(RobustnessError, match="m in 1..K"):
            robust_distance.multi_krum(points, ones, f=1, m=m)
    with pytest.raises(RobustnessError, match="weight zero"):
        robust_distance.multi_krum(points, torch.tensor([1.0, 0, 1, 1, 1]), f=1, m=1)


def test_centered_clipping_one_step_by_hand() -> None:
    updates = torch.tensor([[0.0], [4.0]])
    w = torch.ones(2)
    # reference 1, tau 2: distances 1 and 3; scales 1 and 2/3; v = 1 + .5 (0 - 1) + 1/3 (4 - 1)
    out = robust_iterative.centered_clipping(
        updates, w, f=0, reference=torch.tensor([1.0]), tau=2.0
    )
    torch.testing.assert_close(out, torch.tensor([1.5]))
    # the default tau is 10: 10.5 away is clipped to 10 (mean 5), not kept (5.25)
    far = torch.tensor([[0.0], [10.5]])
    torch.testing.assert_close(
        robust_iterative.centered_clipping(far, w, f=0, reference=torch.tensor([0.0])),
        torch.tensor([5.0]),
    )
    # the result has the updates' dtype whatever the reference's
    r64 = torch.tensor([1.0], dtype=torch.float64)
    assert robust_iterative.centered_clipping(updates, w, f=0, reference=r64).dtype == torch.float32
    for tau, iterations in ((0.0, 1), (-1.0, 1), (1.0, 0)):
        with pytest.raises(RobustnessError, match="tau > 0 and iterations >= 1"):
            robust_iterative.centered_clipping(
                updates, w, f=0, reference=torch.tensor([1.0]), tau=tau, iterations=iterations
            )


def test_norm_bounding_needs_a_positive_bound() -> None:
    updates = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    with pytest.raises(RobustnessError, match="positive"):
        robust_iterative.norm_bounding(updates, torch.ones(2), f=0, bound=0.0)
    out = robust_iterative.norm_bounding(updates, torch.ones(2), f=0, bound=2.5)
    torch.testing.assert_close(out, torch.tensor([(1.5 + 0.0) / 2, (2.0 + 1.0) / 2]))
