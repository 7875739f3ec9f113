"""FedAvg's weighted mean in float64, pinned where float32 would give other numbers (found by
mutation testing)."""

from __future__ import annotations

import torch

from fedguard.algorithms.optimizers import aggregation


def test_float32_weights_are_turned_into_shares_in_float64() -> None:
    # shares 3/10 and 7/10: in float64 the mean is -0.4 * 2^24 = -6710886.4, whose float32 is
    # -6710886.5; shares divided in float32 (0.30000001, 0.69999999) would give -6710886.0
    updates = torch.tensor([[2.0**24], [-(2.0**24)]])
    out = aggregation.weighted_mean(updates, torch.tensor([3.0, 7.0]))
    assert out.dtype == torch.float32
    assert (
        out.item() == torch.tensor(-0.4 * 2**24, dtype=torch.float64).float().item() == -6710886.5
    )


def test_the_sum_is_accumulated_in_float64() -> None:
    # 1/3 + 1e8/3 - 1e8/3: a float32 running sum loses the 1/3 under 3.3e7 and ends at 0
    updates = torch.tensor([[1.0, 2.0], [1e8, -1e8], [-1e8, 1e8]])
    out = aggregation.weighted_mean(updates, torch.tensor([2.5, 2.5, 2.5]))
    assert out.tolist() == [torch.tensor(1 / 3).item(), torch.tensor(2 / 3).item()]


def test_weights_summing_to_less_than_one_are_fine() -> None:
    updates = torch.tensor([[4.0, -2.0], [1.0, 6.0]])
    out = aggregation.weighted_mean(updates, torch.tensor([0.25, 0.5]))
    # (0.25 * 4 + 0.5 * 1) / 0.75 = 2, (0.25 * -2 + 0.5 * 6) / 0.75 = 10 / 3
    assert out.tolist() == [2.0, torch.tensor(10 / 3).item()]
