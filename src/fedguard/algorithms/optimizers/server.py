"""Server optimizers: how the global model moves given the aggregated client update.

Each optimizer is an ``(init, apply)`` pair of pure functions (FedJAX's ``server_update``). The
aggregate ``delta`` is the weighted mean of ``local - global`` over the cohort, so ``-delta`` plays
the role of a pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization"):

* FedAvg:     ``x <- x + lr * delta``
* FedAvgM:    ``m <- momentum * m + delta;  x <- x + lr * m``           (Hsu et al. 2019)
* FedAdagrad: ``v <- v + delta^2;                       x <- x + lr * m / (sqrt(v) + tau)``
* FedAdam:    ``v <- beta2 v + (1 - beta2) delta^2``
* FedYogi:    ``v <- v - (1 - beta2) delta^2 sign(v - delta^2)``
  with ``m <- beta1 m + (1 - beta1) delta`` for the three adaptive ones and ``v`` starting at
  ``tau^2`` as in the paper's Algorithm 2 (no bias correction).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ServerOptimizer(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAGRAD = "fedadagrad"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Hyperparameters of a server optimizer; unused fields are ignored by the simpler ones."""

    kind: ServerOptimizer = ServerOptimizer.FEDAVG
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"The server learning rate must be positive, got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"The server momentum must be in [0, 1), got {self.momentum}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}.")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}.")


@dataclass(frozen=True)
class ServerOptimizerState:
    """First and second moment of the pseudo-gradient (empty tensors when unused)."""

    m: torch.Tensor
    v: torch.Tensor


def init(config: ServerOptimizerConfig, params: torch.Tensor) -> ServerOptimizerState:
    """The optimizer state before the first round, for a global model ``params [D]``."""
    empty = torch.zeros(0, dtype=torch.float32)
    if config.kind is ServerOptimizer.FEDAVG:
        return ServerOptimizerState(empty, empty)
    m = torch.zeros_like(params, dtype=torch.float32)
    if config.kind is ServerOptimizer.FEDAVGM:
        return ServerOptimizerState(m, empty)
    v = torch.full_like(params, config.tau**2, dtype=torch.float32)
    return ServerOptimizerState(m, v)


def apply(
    config: ServerOptimizerConfig,
    state: ServerOptimizerState,
    params: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[ServerOptimizerState, torch.Tensor]:
    """One server step: returns the new state and the new global parameters."""
    if delta.shape != params.shape:
        raise ValueError(
            f"The aggregate has shape {tuple(delta.shape)}, the model {tuple(params.shape)}."
        )
    kind = config.kind
    if kind is ServerOptimizer.FEDAVG:
        return state, params + config.lr * delta
    if kind is ServerOptimizer.FEDAVGM:
        m = config.momentum * state.m + delta
        return ServerOptimizerState(m, state.v), params + config.lr * m
    m = config.beta1 * state.m + (1.0 - config.beta1) * delta
    sq = delta * delta
    if kind is ServerOptimizer.FEDADAGRAD:
        v = state.v + sq
    elif kind is ServerOptimizer.FEDADAM:
        v = config.beta2 * state.v + (1.0 - config.beta2) * sq
    else:
        v = state.v - (1.0 - config.beta2) * sq * torch.sign(state.v - sq)
    new_params = params + config.lr * m / (torch.sqrt(v) + config.tau)
    return ServerOptimizerState(m, v), new_params
