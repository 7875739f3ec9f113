"""Stacked SGD and Adam against a scalar loop per row, with masked steps (found by mutation
testing). The reference follows torch.optim's formulas one float64 scalar at a time."""

from __future__ import annotations

import math

import pytest
import torch

from fedguard.algorithms.optimizers import stacked

# three models (rows) of a [2, 2] parameter; row 1 sits out steps 2 and 3
P0 = torch.tensor(
    [[[0.5, -1.0], [2.0, 0.25]], [[-0.75, 1.5], [0.0, 3.0]], [[1.25, 0.5], [-2.0, -0.5]]],
    dtype=torch.float64,
)
GRADS = [
    torch.tensor(
        [[[0.3, -0.2], [1.1, 0.4]], [[-0.6, 0.9], [0.05, -1.3]], [[0.7, 0.1], [-0.4, 0.8]]],
        dtype=torch.float64,
    )
    * (step + 1) ** 0.5
    * (-1) ** step
    for step in range(4)
]
ACTIVE = [
    torch.tensor([True, True, True]),
    torch.tensor([True, False, True]),
    torch.tensor([True, False, False]),
    torch.tensor([True, True, True]),
]


def _reference_sgd(lr: float, momentum: float, wd: float) -> tuple[list[float], list[float]]:
    """Every scalar of P0 through the masked steps: final parameters and momentum buffers."""
    params, bufs = P0.flatten().tolist(), [0.0] * P0.numel()
    per_row = P0[0].numel()
    for grads, active in zip(GRADS, ACTIVE, strict=True):
        g = grads.flatten().tolist()
        for i in range(len(params)):
            if not active[i // per_row]:
                continue
            d = g[i] + wd * params[i]
            if momentum != 0:
                bufs[i] = momentum * bufs[i] + d
                d = bufs[i]
            params[i] -= lr * d
    return params, bufs


def _reference_adam(lr: float, wd: float) -> tuple[list[float], list[float], list[float]]:
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = P0.flatten().tolist()
    m1, m2 = [0.0] * len(params), [0.0] * len(params)
    per_row = P0[0].numel()
    steps = [0, 0, 0]
    for grads, active in zip(GRADS, ACTIVE, strict=True):
        g = grads.flatten().tolist()
        for r in range(3):
            steps[r] += bool(active[r])
        for i in range(len(params)):
            r = i // per_row
            if not active[r]:
                continue
            d = g[i] + wd * params[i]
            m1[i] = b1 * m1[i] + (1 - b1) * d
            m2[i] = b2 * m2[i] + (1 - b2) * d * d
            t = steps[r]
            m_hat_scale = lr / (1 - b1**t)
            denom = math.sqrt(m2[i]) / math.sqrt(1 - b2**t) + eps
            params[i] -= m_hat_scale * m1[i] / denom
    return params, m1, m2


def test_init_is_zero_state_for_k_models() -> None:
    q = torch.ones(3, 5, dtype=torch.float32)
    sgd = stacked.init([P0, q], adam=False)
    assert [t.shape for t in sgd.first] == [P0.shape, q.shape]
    assert all(bool((t == 0).all()) for t in sgd.first)
    assert sgd.first[1].dtype == torch.float32
    assert sgd.second == ()
    assert sgd.steps.dtype == torch.int64 and sgd.steps.tolist() == [0, 0, 0]
    adam = stacked.init([P0, q], adam=True)
    assert [t.shape for t in adam.second] == [P0.shape, q.shape]
    assert all(bool((t == 0).all()) for t in adam.second)
    assert stacked.init([], adam=True).steps.shape == (0,)


@pytest.mark.parametrize(
    ("lr", "momentum", "wd"), [(0.1, 0.0, 0.0), (0.1, 0.0, 0.3), (0.05, 0.7, 0.0), (0.2, 0.9, 0.25)]
)
def test_sgd_matches_the_scalar_loop(lr: float, momentum: float, wd: float) -> None:
    state, params = stacked.init([P0], adam=False), [P0.clone()]
    for grads, active in zip(GRADS, ACTIVE, strict=True):
        state, params = stacked.sgd(
            state, params, [grads], active, lr=lr, momentum=momentum, weight_decay=wd
        )
    want_params, want_bufs = _reference_sgd(lr, momentum, wd)
    assert params[0].flatten().tolist() == pytest.approx(want_params, rel=1e-12, abs=1e-12)
    assert state.first[0].flatten().tolist() == pytest.approx(want_bufs, rel=1e-12, abs=1e-12)
    assert state.steps.tolist() == [4, 2, 3]
    assert state.second == ()


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_adam_matches_the_scalar_loop(wd: float) -> None:
    state, params = stacked.init([P0], adam=True), [P0.clone()]
    for grads, active in zip(GRADS, ACTIVE, strict=True):
        state, params = stacked.adam(state, params, [grads], active, lr=0.05, weight_decay=wd)
    want_params, want_m1, want_m2 = _reference_adam(0.05, wd)
    assert params[0].flatten().tolist() == pytest.approx(want_params, rel=1e-10, abs=1e-12)
    assert state.first[0].flatten().tolist() == pytest.approx(want_m1, rel=1e-10, abs=1e-14)
    assert state.second[0].flatten().tolist() == pytest.approx(want_m2, rel=1e-10, abs=1e-16)
    assert state.steps.tolist() == [4, 2, 3]


def test_an_inactive_row_keeps_its_parameters_and_state_exactly() -> None:
    on = torch.tensor([False, True, False])
    for adam in (False, True):
        state = stacked.init([P0], adam=adam)
        if adam:
            state, params = stacked.adam(state, [P0], [GRADS[0]], on, lr=0.1, weight_decay=0.1)
        else:
            state, params = stacked.sgd(
                state, [P0], [GRADS[0]], on, lr=0.1, momentum=0.5, weight_decay=0.1
            )
        assert torch.equal(params[0][0], P0[0]) and torch.equal(params[0][2], P0[2])
        assert not torch.equal(params[0][1], P0[1])
        assert bool((state.first[0][0] == 0).all()) and bool((state.first[0][1] != 0).all())
        assert state.steps.tolist() == [0, 1, 0]


def test_a_first_adam_step_moves_every_coordinate_by_about_lr() -> None:
    """t = 1: m1 = 0.1 d, m2 = 0.001 d^2, so the step is lr * d / (|d| + eps / ...) ~ lr sign(d)."""
    p = torch.zeros(2, 3, dtype=torch.float32)
    g = torch.tensor([[2.0, -0.5, 1e-3], [-4.0, 8.0, -1e-2]])
    state, params = stacked.adam(
        stacked.init([p], adam=True), [p], [g], torch.tensor([True, True]), lr=0.01, weight_decay=0
    )
    assert params[0].dtype == torch.float32
    want = [
        [-0.01 * abs(x) / (abs(x) + 1e-8) * math.copysign(1, x) for x in row] for row in g.tolist()
    ]
    assert params[0].tolist() == [pytest.approx(row, rel=1e-5) for row in want]
    assert state.steps.tolist() == [1, 1]


def test_a_state_of_another_parameter_list_is_refused() -> None:
    p, q = P0.clone(), torch.ones(3, 4, dtype=torch.float64)
    on = torch.tensor([True, True, True])
    sgd_state = stacked.init([p], adam=False)  # one parameter, two given
    with pytest.raises(ValueError, match="zip"):
        stacked.sgd(sgd_state, [p, q], [p, q], on, lr=0.1, momentum=0.5, weight_decay=0)
    adam_state = stacked.init([p], adam=True)
    with pytest.raises(ValueError, match="zip"):
        stacked.adam(adam_state, [p, q], [p, q], on, lr=0.1, weight_decay=0)
    # Adam's first and second moments are checked alike
    half = stacked.StackedState(adam_state.first + (torch.zeros_like(q),), (), adam_state.steps)
    with pytest.raises(ValueError, match="zip"):
        stacked.adam(half, [p, q], [p, q], on, lr=0.1, weight_decay=0)


@pytest.mark.parametrize("adam", [False, True])
def test_without_weight_decay_an_infinite_parameter_stays_infinite_as_in_torch_optim(
    adam: bool,
) -> None:
    """torch.optim adds ``wd * p`` only for ``wd != 0``: with ``wd = 0`` an infinite entry stays
    infinite (``0 * inf`` would make it NaN) and the other entries take the plain step."""
    p = torch.tensor([[float("inf"), 1.0], [2.0, -3.0]], dtype=torch.float64)
    g = torch.tensor([[0.5, -0.25], [1.0, 2.0]], dtype=torch.float64)
    on = torch.tensor([True, True])
    state = stacked.init([p], adam=adam)
    if adam:
        state, params = stacked.adam(state, [p], [g], on, lr=0.1, weight_decay=0.0)
        ref = torch.nn.Parameter(p.clone())
        opt: torch.optim.Optimizer = torch.optim.Adam([ref], lr=0.1, weight_decay=0.0)
    else:
        state, params = stacked.sgd(state, [p], [g], on, lr=0.1, momentum=0.9, weight_decay=0.0)
        ref = torch.nn.Parameter(p.clone())
        opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.0)
    ref.grad = g.clone()
    opt.step()
    assert not bool(params[0].isnan().any()) and not bool(state.first[0].isnan().any())
    assert params[0][0, 0].item() == float("inf")
    torch.testing.assert_close(params[0], ref.detach(), rtol=1e-12, atol=1e-12)


def test_a_weight_decay_of_one_is_applied() -> None:
    state, params = stacked.init([P0], adam=False), [P0.clone()]
    on = torch.tensor([True, True, True])
    state, params = stacked.sgd(state, params, [GRADS[0]], on, lr=0.1, momentum=0.0, weight_decay=1)
    torch.testing.assert_close(params[0], P0 - 0.1 * (GRADS[0] + P0), rtol=1e-15, atol=0)
    state, params = stacked.init([P0], adam=True), [P0.clone()]
    state, params = stacked.adam(state, params, [GRADS[0]], on, lr=0.1, weight_decay=1)
    # first Adam step: m1 = 0.1 d, m2 = 0.001 d^2, bias-corrected: p - lr d / (|d| + eps)
    d = GRADS[0] + P0
    torch.testing.assert_close(params[0], P0 - 0.1 * d / (d.abs() + 1e-8), rtol=1e-9, atol=1e-12)
