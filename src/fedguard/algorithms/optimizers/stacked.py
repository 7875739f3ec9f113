"""SGD and Adam over stacked parameters: one step for ``K`` models at once, each row masked.

The cohort engine trains ``K`` clients' copies of one model together; every tensor here has the
clients on its first dimension (``[K, *shape]``). ``active`` (``[K]`` bool) says which clients take
this step: a client without a batch at this step keeps its parameters and optimizer state
unchanged, exactly as if the step had not happened (its Adam step count too).

The arithmetic is that of ``torch.optim.SGD`` and ``torch.optim.Adam`` (defaults ``betas = (0.9,
0.999)``, ``eps = 1e-8``, no AMSGrad, coupled L2 weight decay, no dampening or Nesterov):

* SGD: ``d = g + wd p``; with momentum ``m``: ``b = m b + d`` (``b = d`` on the first step) and
  ``d = b``; then ``p = p - lr d``.
* Adam (Kingma & Ba 2015): ``d = g + wd p``; ``m1 = m1 + (1 - beta1)(d - m1)``;
  ``m2 = beta2 m2 + (1 - beta2) d^2``; ``p = p - lr / (1 - beta1^t) * m1 / (sqrt(m2) /
  sqrt(1 - beta2^t) + eps)``, where ``t`` counts the steps this client took.

Steps are counted per client; in the cohort engine a client's steps are a prefix of the cohort's
(it stops when its batches run out and never resumes), so all active clients share ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class StackedState:
    """Optimizer state of ``K`` models: ``first`` (SGD's momentum buffers or Adam's first
    moments) and ``second`` (Adam's second moments; empty for SGD), one tensor per parameter
    like the parameters, and ``steps`` ``[K]``, the steps each model took."""

    first: tuple[torch.Tensor, ...]
    second: tuple[torch.Tensor, ...]
    steps: torch.Tensor


def init(params: list[torch.Tensor], *, adam: bool) -> StackedState:
    """Zero state for the stacked ``params`` (``[K, *shape]`` each)."""
    k = params[0].shape[0] if params else 0
    zeros = tuple(torch.zeros_like(p) for p in params)
    second = tuple(torch.zeros_like(p) for p in params) if adam else ()
    return StackedState(zeros, second, torch.zeros(k, dtype=torch.int64))


def _rows(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``active`` ``[K]`` shaped to broadcast over ``like`` ``[K, ...]``."""
    return active.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def _pick(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` in the ``active`` rows, ``old`` elsewhere (``new`` itself when all are active)."""
    if bool(active.all()):
        return new
    return torch.where(_rows(active, new), new, old)


def sgd(
    state: StackedState,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    active: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[StackedState, list[torch.Tensor]]:
    """One SGD step of the ``active`` rows; returns the new state and parameters."""
    new_params, new_first = [], []
    for p, g, b in zip(params, grads, state.first, strict=True):
        d = g if weight_decay == 0 else g + weight_decay * p
        if momentum != 0:
            # b starts at zero, so the first step gives b = 0 * m + d = d exactly.
            b_next = b * momentum + d
            new_first.append(_pick(active, b_next, b))
            d = b_next
        else:
            new_first.append(b)
        new_params.append(_pick(active, p - lr * d, p))
    return StackedState(tuple(new_first), state.second, state.steps + active.long()), new_params


def adam(
    state: StackedState,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    active: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
) -> tuple[StackedState, list[torch.Tensor]]:
    """One Adam step of the ``active`` rows; returns the new state and parameters."""
    beta1, beta2 = ADAM_BETAS
    steps = state.steps + active.long()
    t = steps.clamp(min=1).to(torch.float64)
    # per row, in float64 as torch computes these Python scalars
    correction1 = 1 - beta1**t
    step_size = (lr / correction1) * -1
    correction2_sqrt = (1 - beta2**t) ** 0.5
    new_params, new_first, new_second = [], [], []
    for p, g, m1, m2 in zip(params, grads, state.first, state.second, strict=True):
        d = g if weight_decay == 0 else g + weight_decay * p
        m1_next = torch.lerp(m1, d, 1 - beta1)
        m2_next = m2 * beta2 + (1 - beta2) * d * d
        size = _rows(step_size, p).to(p)
        denom = m2_next.sqrt() / _rows(correction2_sqrt, p).to(p) + ADAM_EPS
        new_params.append(_pick(active, p + size * (m1_next / denom), p))
        new_first.append(_pick(active, m1_next, m1))
        new_second.append(_pick(active, m2_next, m2))
    return StackedState(tuple(new_first), tuple(new_second), steps), new_params
