"""FedBuff's staleness weights and scaled rows at their edges (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.optimizers import fedbuff


def test_staleness_weights_are_float64_powers_of_one_plus_tau() -> None:
    tau = torch.tensor([0, 2, 7], dtype=torch.int32)
    got = fedbuff.staleness_weights(tau, 1.5)
    assert got.dtype == torch.float64
    # (1 + tau)^(-1.5): 1, 3^-1.5, 8^-1.5
    expected = [1.0, 3.0**-1.5, 8.0**-1.5]
    assert got.tolist() == pytest.approx(expected, rel=1e-15)
    # a weight below float32's resolution of 1 stays exact in float64
    assert fedbuff.staleness_weights(torch.tensor([2**25 - 1]), 1.0).item() == 2.0**-25


def test_an_exponent_of_zero_is_allowed_and_a_negative_one_refused() -> None:
    assert fedbuff.staleness_weights(torch.tensor([0, 5]), 0.0).tolist() == [1.0, 1.0]
    for exponent in (-0.5, -1e-9):
        with pytest.raises(ValueError, match="non-negative"):
            fedbuff.staleness_weights(torch.tensor([1]), exponent)


def test_zero_staleness_is_allowed_and_any_negative_entry_refused() -> None:
    assert fedbuff.staleness_weights(torch.tensor([0]), 2.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="cannot be negative"):
        fedbuff.staleness_weights(torch.tensor([3, 0, -1]), 0.5)


def test_scaled_rows_keep_the_updates_dtype_and_weigh_in_float64() -> None:
    updates = torch.tensor([[3.0, -6.0], [1.0, 0.25], [2.0, 2.0]], dtype=torch.float32)
    tau = torch.tensor([0, 3, 1])
    got = fedbuff.scaled_updates(updates, tau, 0.5)
    assert got.dtype == torch.float32
    w = [1.0, 4.0**-0.5, 2.0**-0.5]
    expected = torch.tensor(
        [[3.0 * w[0], -6.0 * w[0]], [1.0 * w[1], 0.25 * w[1]], [2.0 * w[2], 2.0 * w[2]]],
        dtype=torch.float64,
    ).to(torch.float32)
    assert torch.equal(got, expected)
    doubles = fedbuff.scaled_updates(updates.double(), tau, 0.5)
    assert doubles.dtype == torch.float64
    assert doubles[2].tolist() == pytest.approx([2.0 * w[2]] * 2, rel=1e-15)


@pytest.mark.parametrize(
    ("updates", "staleness"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64)),  # updates not [K, D]
        (torch.zeros(1, 2, 3), torch.zeros(1, dtype=torch.int64)),
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64)),  # K mismatch
        (torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64)),  # staleness not [K]
    ],
)
def test_scaled_rows_need_updates_k_by_d_and_staleness_k(updates, staleness) -> None:
    with pytest.raises(ValueError, match=r"Need updates \[K, D\] and staleness \[K\]"):
        fedbuff.scaled_updates(updates, staleness, 0.5)
