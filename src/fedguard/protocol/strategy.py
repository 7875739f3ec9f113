"""Strategies: the server half of each federated optimizer, plus what it tells clients to do.

A strategy is configured once and then used per round: ``fit_instructions`` says what the
clients run (the client half: FedProx's proximal term, SCAFFOLD's control variate), ``aggregate``
turns the accepted replies into the next global model with a pure server optimizer from
:mod:`fedguard.algorithms.server_optimizers`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedguard.algorithms import aggregation, newton, scaffold, server_optimizers
from fedguard.protocol import messages

CONTROL = "control"


class StrategyKind(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"


_SERVER_OPTIMIZER = {
    StrategyKind.FEDAVG: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDPROX: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.SCAFFOLD: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDAVGM: server_optimizers.ServerOptimizer.FEDAVGM,
    StrategyKind.FEDADAM: server_optimizers.ServerOptimizer.FEDADAM,
    StrategyKind.FEDYOGI: server_optimizers.ServerOptimizer.FEDYOGI,
    StrategyKind.FEDADAGRAD: server_optimizers.ServerOptimizer.FEDADAGRAD,
}


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds besides the global parameters."""

    optimizer: server_optimizers.ServerOptimizerState
    control: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for a checkpoint."""
        return {
            "optimizer.m": self.optimizer.m,
            "optimizer.v": self.optimizer.v,
            CONTROL: self.control,
        }

    @classmethod
    def from_tensors(cls, named: Mapping[str, torch.Tensor]) -> ServerState:
        opt = server_optimizers.ServerOptimizerState(named["optimizer.m"], named["optimizer.v"])
        return cls(opt, named[CONTROL])


@dataclass(frozen=True)
class Strategy:
    """A federated optimizer: server optimizer settings, client instructions, and its extras."""

    kind: StrategyKind
    server: server_optimizers.ServerOptimizerConfig
    client_config: Mapping[str, messages.Scalar]
    num_clients: int

    @classmethod
    def create(
        cls,
        kind: StrategyKind,
        *,
        client_config: Mapping[str, messages.Scalar],
        num_clients: int,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> Strategy:
        server = server_optimizers.ServerOptimizerConfig(
            kind=_SERVER_OPTIMIZER[kind],
            lr=server_lr,
            momentum=server_momentum,
            beta1=beta1,
            beta2=beta2,
            tau=tau,
        )
        config = dict(client_config)
        if kind is not StrategyKind.FEDPROX:
            config["proximal_mu"] = 0.0
        return cls(kind, server, config, num_clients)

    @property
    def newton(self) -> bool:
        return self.client_config.get("optimizer") == "newton"

    def required_tensors(self, dim: int) -> dict[str, int]:
        """Tensors every fit reply must carry, with their lengths."""
        if self.kind is StrategyKind.SCAFFOLD:
            return {"control_delta": dim}
        if self.newton:
            return {"gradient_sum": dim, "hessian_sum": dim * dim}
        return {}

    def init(self, params: torch.Tensor) -> ServerState:
        control = torch.zeros_like(params) if self.kind is StrategyKind.SCAFFOLD else torch.zeros(0)
        return ServerState(server_optimizers.init(self.server, params), control)

    def fit_instructions(
        self, state: ServerState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        """The config and tensors every sampled client receives this round."""
        tensors = {CONTROL: state.control} if self.kind is StrategyKind.SCAFFOLD else {}
        return dict(self.client_config), tensors

    def aggregate(
        self,
        state: ServerState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
    ) -> tuple[ServerState, torch.Tensor]:
        """The next server state and global parameters from the accepted replies."""
        weights = torch.tensor([float(r.num_examples) for r in replies])
        if self.newton:
            gradient = torch.stack([r.tensors["gradient_sum"] for r in replies]).double().sum(0)
            hessian = torch.stack([r.tensors["hessian_sum"] for r in replies]).double().sum(0)
            delta = newton.newton_direction(
                gradient, hessian.view(params.shape[0], -1), float(weights.sum()), damping=1e-8
            )
        else:
            delta = aggregation.weighted_mean(torch.stack([r.update for r in replies]), weights)
        opt_state, new_params = server_optimizers.apply(self.server, state.optimizer, params, delta)
        control = state.control
        if self.kind is StrategyKind.SCAFFOLD:
            deltas = torch.stack([r.tensors["control_delta"] for r in replies])
            control = scaffold.server_control_update(control, deltas, num_clients=self.num_clients)
        return replace(state, optimizer=opt_state, control=control), new_params
