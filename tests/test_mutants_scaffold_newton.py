"""SCAFFOLD's server variate and the Newton step with exact numbers (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.optimizers import newton, scaffold


def test_server_control_moves_by_cohort_fraction_times_float64_mean() -> None:
    server = torch.tensor([1.0, 2.0])
    deltas = torch.tensor([[3.0, 6.0], [1.0, 2.0], [2.0, 1.0]])  # K = 3 clients, D = 2
    out = scaffold.server_control_update(server, deltas, num_clients=12)
    # |S| / N = 3 / 12; means [2, 3]
    torch.testing.assert_close(out, torch.tensor([1.5, 2.75]), rtol=0, atol=0)
    assert out.dtype == torch.float32
    # accumulated in float64: 1e8 + 1 - 1e8 is 1, not float32's 0
    big = torch.tensor([[1e8], [1.0], [-1e8]])
    exact = scaffold.server_control_update(torch.zeros(1), big, num_clients=3)
    torch.testing.assert_close(exact, torch.tensor([1.0 / 3.0]))
    with pytest.raises(ValueError):
        scaffold.server_control_update(server, torch.zeros(0, 2), num_clients=3)


def test_newton_step_solves_the_pooled_damped_system() -> None:
    g = torch.tensor([2.0, -4.0])
    h = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float32)
    # n = 2: H/n = [[2, .5], [.5, 1]], g/n = [1, -2]; with damping 1: [[3, .5], [.5, 2]]
    step = newton.newton_direction(g, h, 2.0, damping=1.0)
    expected = -torch.linalg.solve(
        torch.tensor([[3.0, 0.5], [0.5, 2.0]], dtype=torch.float64),
        torch.tensor([1.0, -2.0], dtype=torch.float64),
    )
    torch.testing.assert_close(step, expected.float(), rtol=1e-6, atol=0)
    assert step.dtype == torch.float32
    one = newton.newton_direction(g, h, 1.0)  # one example: no division
    expected_one = -torch.linalg.solve(h.double(), g.double()).float()
    torch.testing.assert_close(one, expected_one, rtol=1e-6, atol=0)
    half = newton.newton_direction(g, h, 0.5)  # a fractional count is a positive count
    torch.testing.assert_close(half, expected_one, rtol=1e-6, atol=0)
    # float64 Hessian: a nearly singular one is solved exactly, not lost to float32 rounding
    tight = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-9]], dtype=torch.float64)
    near = newton.newton_direction(torch.tensor([1.0, 1.0]), tight, 1.0)
    torch.testing.assert_close(near, torch.tensor([-1.0, 0.0]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="singular"):
        newton.newton_direction(torch.tensor([1.0, 1.0]), torch.ones(2, 2), 1.0)
    # a regular system with a non-finite gradient gives a non-finite step: refused as well
    with pytest.raises(ValueError):
        newton.newton_direction(torch.tensor([float("inf"), 1.0]), torch.eye(2), 1.0)


def test_newton_divides_a_float32_hessian_in_float64() -> None:
    # ill-conditioned (condition ~4e4): float32 division by 3 would move the step by ~1e-3
    h32 = torch.tensor([[1.0, 1.0], [1.0, 1.0001]], dtype=torch.float32)
    g = torch.tensor([1.0, 0.0])
    step = newton.newton_direction(g, h32, 3.0)
    reference = -torch.linalg.solve(h32.double() / 3.0, g.double() / 3.0)
    torch.testing.assert_close(step, reference.float(), rtol=1e-6, atol=0)
