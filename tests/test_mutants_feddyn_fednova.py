"""FedDyn's server update and FedNova's normalisation at their edges (found by mutation
testing): shapes refused and allowed, float64 sums under cancellation, dtypes kept, and the
smallest valid step counts and norms."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.optimizers import feddyn, fednova


def test_feddyn_refuses_malformed_updates_and_allows_full_participation() -> None:
    params, h = torch.zeros(3), torch.zeros(3)
    for bad in (torch.zeros(3), torch.zeros(0, 3), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match="FedDyn needs a non-empty"):
            feddyn.server_update(params, h, bad, alpha=0.5, num_clients=4)
    with pytest.raises(ValueError, match="from a population of 2"):
        feddyn.server_update(params, h, torch.zeros(3, 3), alpha=0.5, num_clients=2)
    # one update, and as many updates as clients, with more coordinates than clients
    one = feddyn.server_update(
        torch.zeros(5), torch.zeros(5), torch.ones(1, 5), alpha=0.5, num_clients=2
    )
    torch.testing.assert_close(one[0], torch.full((5,), -0.25))  # h = -0.5 * (1/2) * 1
    every = feddyn.server_update(
        torch.zeros(5), torch.zeros(5), torch.ones(2, 5), alpha=0.5, num_clients=2
    )
    torch.testing.assert_close(every[0], torch.full((5,), -0.5))
    torch.testing.assert_close(every[1], torch.full((5,), 2.0))  # 0 + 1 - (-0.5 / 0.5)


def test_feddyn_sums_in_float64_and_keeps_the_dtypes() -> None:
    # float32 updates whose mean cancels: 2^24 + 1 + 1 is 2^24 in float32 sums
    deltas = torch.tensor([[16_777_216.0], [1.0], [1.0]], dtype=torch.float32)
    params = torch.tensor([-5_592_405.0], dtype=torch.float32)
    h = torch.zeros(1, dtype=torch.float32)
    new_h, new_params = feddyn.server_update(params, h, deltas, alpha=0.25, num_clients=6)
    mean = (16_777_216 + 2) / 3  # 5,592,406 exactly
    expected_h = -0.25 * (3 / 6) * mean
    assert new_h.dtype == torch.float32 and new_params.dtype == torch.float32
    assert float(new_h) == pytest.approx(expected_h, rel=1e-7)
    assert float(new_params) == pytest.approx(-5_592_405.0 + mean - expected_h / 0.25, abs=0.5)
    assert float(new_params) == pytest.approx(2_796_204.0, abs=0.5)


def test_fednova_refuses_mismatched_and_non_positive_norms() -> None:
    d = torch.ones(2, 3)
    with pytest.raises(ValueError, match="one step norm and one weight per update"):
        fednova.aggregate(d, torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one step norm and one weight per update"):
        fednova.aggregate(d, torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))
    for norms in ([float("inf"), 2.0], [float("nan"), 2.0], [0.0, 2.0], [-1.5, 2.0]):
        with pytest.raises(ValueError, match="finite and positive"):
            fednova.aggregate(d, torch.tensor(norms), torch.tensor([1.0, 2.0]))
    out = fednova.aggregate(d * 0.5, torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out, torch.full((3,), 0.5 * 1.5))  # tau_eff = (3 + 3) / 4


def test_fednova_normalise_and_step_norm_at_their_smallest_inputs() -> None:
    delta = torch.tensor([1.5, -3.0], dtype=torch.float32)
    one = fednova.normalise(delta, 1.0)
    assert one.dtype == torch.float32
    torch.testing.assert_close(one, delta)
    torch.testing.assert_close(fednova.normalise(delta, 0.75), torch.tensor([2.0, -4.0]))
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="must be positive"):
            fednova.normalise(delta, bad)
    assert fednova.step_norm(1) == 1.0
    assert fednova.step_norm(1, 0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one local step"):
        fednova.step_norm(0)
