"""The server half of FedRep and FedPer: only the shared body of the model is aggregated.

A client of FedRep or FedPer sends a zero update at every head position
(:mod:`fedguard.client.personal`), so its head never leaves it. This layer makes the server's
side of that independent of what a client sends: every update's head positions are set to zero
before the wrapped strategy aggregates (a client that sends its head anyway, or an attacker,
changes nothing), a sum's head positions likewise (secure aggregation, central DP), and the new
global model keeps the previous head values. So the global model is a function of the clients'
body positions alone; the global head stays at its initial values and serves only as the start
of a client's head before it has one. It sits under central DP (which clips and noises the
whole sum) and over any strategy and aggregator; robust rules compare updates whose head
positions are all zero, so they compare bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedguard.algorithms import personalization
from fedguard.protocol import messages
from fedguard.protocol.strategy import LeftOut, Strategy, StrategyState


@dataclass(frozen=True)
class SharedPart(Strategy):
    """``inner`` aggregating only the positions outside ``head`` (a boolean ``[D]`` mask)."""

    inner: Strategy
    head: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregator", self.inner.aggregator)

    def init(self, params: torch.Tensor) -> StrategyState:
        return self.inner.init(params)

    def restore(self, named: Mapping[str, torch.Tensor]) -> StrategyState:
        return self.inner.restore(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        return self.inner.fit_instructions(state)

    def client_instructions(
        self, state: StrategyState, client_id: int
    ) -> dict[str, messages.Scalar]:
        return self.inner.client_instructions(state, client_id)

    def client_features(self) -> frozenset[str]:
        return self.inner.client_features()

    def required_tensors(self, dim: int) -> dict[str, int]:
        return self.inner.required_tensors(dim)

    def sum_refusal(self) -> str | None:
        return self.inner.sum_refusal()

    def secure_aggregation_refusal(self) -> str | None:
        return self.inner.secure_aggregation_refusal()

    def _keep_head(self, params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        return personalization.combine(new_params, params.to(new_params.dtype), self.head)

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        new_state, new_params, _ = self.aggregate_reporting(state, params, replies, round_=round_)
        return new_state, new_params

    def aggregate_reporting(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor, LeftOut | None]:
        """:meth:`aggregate`, with the inner aggregator's report of what it left out (a robust
        rule compares the bodies)."""
        bodies = [
            replace(r, update=personalization.body_only(r.update, self.head)) for r in replies
        ]
        new_state, new_params, left_out = self.inner.aggregate_reporting(
            state, params, bodies, round_=round_
        )
        return new_state, self._keep_head(params, new_params), left_out

    def aggregate_sum(
        self,
        state: StrategyState,
        params: torch.Tensor,
        total: torch.Tensor,
        weight: float,
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        body = personalization.body_only(total, self.head)
        new_state, new_params = self.inner.aggregate_sum(state, params, body, weight, round_=round_)
        return new_state, self._keep_head(params, new_params)
