"""User-level central DP as a layer over any strategy that aggregates a sum (DP-FedAvg).

McMahan et al. (2018): every client clips its update to ``C`` before it leaves (the fit config
carries the clip), the server clips again (a client may lie), adds Gaussian noise of std
``z * C`` to the sum and divides by the fixed expected number of clients; with adaptive clipping
(Andrew et al. 2021) ``C`` follows a quantile of the update norms through a privatised count of
the clients' "unclipped" bits. The layer hands the noised sum to the wrapped strategy's
:meth:`~fedguard.protocol.strategy.Strategy.aggregate_sum`, which moves the model as it would
with any sum (FedAvg, FedAvgM, FedAdam, ...), so the layer composes with fedguard's strategies
and a user's alike. Under secure aggregation the server never sees an update and cannot re-clip:
the guarantee then rests on the clients' clip. The clip is server state (``dp_clip_norm``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedguard.algorithms.privacy import dp_fedavg
from fedguard.protocol import messages
from fedguard.protocol.aggregator import label
from fedguard.protocol.strategy import (
    CLIP_NORM,
    CentralDP,
    ServerState,
    Strategy,
    StrategyState,
)


def _with_clip(state: StrategyState, clip: float) -> StrategyState:
    tensor = torch.tensor([clip], dtype=torch.float64)
    if isinstance(state, ServerState):
        return replace(state, clip_norm=tensor)
    return {**state, CLIP_NORM: tensor}


def _without_clip(state: StrategyState) -> StrategyState:
    """The wrapped strategy's own part of ``state`` (a built-in's keeps the clip field)."""
    if isinstance(state, ServerState):
        return state
    return {k: v for k, v in state.items() if k != CLIP_NORM}


@dataclass(frozen=True)
class CentralPrivacy(Strategy):
    """``inner`` with user-level DP-FedAvg on its updates (settings ``dp``)."""

    inner: Strategy
    dp: CentralDP

    def __post_init__(self) -> None:
        aggregator = self.inner.aggregator
        object.__setattr__(self, "aggregator", aggregator)
        if aggregator is not None and aggregator.needs_individual_updates:
            raise ValueError(
                f"Central DP noise is calibrated for the mean's sensitivity, not for "
                f"{label(aggregator)}; use norm bounding or the mean with central DP."
            )
        refusal = self.inner.sum_refusal()
        if refusal is not None or self.inner.required_tensors(1):
            raise ValueError(
                "Central DP privatises the sum of the model updates only: "
                f"{refusal or 'the replies of this strategy carry more tensors'}."
            )

    @property
    def client_config(self) -> Mapping[str, messages.Scalar]:
        """The wrapped strategy's client config (without the round's clip)."""
        config: Mapping[str, messages.Scalar] = getattr(self.inner, "client_config", {})
        return config

    def init(self, params: torch.Tensor) -> StrategyState:
        return _with_clip(self.inner.init(params), self.dp.clip_norm)

    def restore(self, named: Mapping[str, torch.Tensor]) -> StrategyState:
        return self.inner.restore(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        config, tensors = self.inner.fit_instructions(_without_clip(state))
        config[CLIP_NORM] = float(state[CLIP_NORM][0])
        return config, tensors

    def client_instructions(
        self, state: StrategyState, client_id: int
    ) -> dict[str, messages.Scalar]:
        return self.inner.client_instructions(_without_clip(state), client_id)

    def client_features(self) -> frozenset[str]:
        return self.inner.client_features()

    def sum_refusal(self) -> str | None:
        return self.inner.sum_refusal()

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        """DP-FedAvg: re-clip every update, noisy sum over the fixed denominator.

        Clients clip already; the server clips again so that the guarantee does not rest on
        them while it can see the updates. An aggregator with a norm bound (norm bounding) is
        one clip, at the smaller of the two norms.
        """
        dp = self.dp
        clip = float(state[CLIP_NORM][0])
        bound = clip
        aggregator = self.inner.aggregator
        if aggregator is not None and aggregator.norm_bound is not None:
            bound = min(clip, aggregator.norm_bound)
        clipped = [dp_fedavg.clip_update(r.update, bound) for r in replies]
        total = torch.stack([c.update for c in clipped]).double().sum(0)
        generator = dp.generator(round_)
        noised = dp.noisy_sum(total, clip, generator)
        if dp.adaptive:
            # The bit is whether the client's update was at most the clip *before* the client
            # clipped it: only the client knows (the server sees the clipped update, never
            # longer than the clip). A reply the server had to re-clip counts as clipped; any
            # report is mapped to one bit, which is all the count's sensitivity assumes.
            bits = [
                c.unclipped and r.metrics.get(messages.DP_UNCLIPPED, 1.0) >= 0.5
                for c, r in zip(clipped, replies, strict=True)
            ]
            clip, _ = dp_fedavg.next_clip_norm(
                clip,
                float(sum(bits)),
                len(clipped),
                target_quantile=dp.target_quantile,
                denominator=dp.expected_clients,
                learning_rate=dp.clip_learning_rate,
                count_stddev=dp.count_stddev,
                generator=generator,
            )
        new_state, new_params = self.inner.aggregate_sum(
            _without_clip(state), params, noised, dp.expected_clients, round_=round_
        )
        return _with_clip(new_state, clip), new_params

    def aggregate_sum(
        self,
        state: StrategyState,
        params: torch.Tensor,
        total: torch.Tensor,
        weight: float,
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        """A securely aggregated sum of the clients' clipped updates (``weight`` is their count:
        user-level DP sums unweighted updates) gets the same noise and fixed denominator as in
        :meth:`aggregate`. Adaptive clipping is not available here: it needs each client's
        clipped bit."""
        refusal = self.secure_aggregation_refusal()
        if refusal is not None:
            raise ValueError(f"Secure aggregation cannot serve this strategy: {refusal}.")
        dp = self.dp
        if dp.adaptive:
            raise ValueError(
                "Adaptive clipping needs each client's clipped bit, which secure aggregation hides."
            )
        clip = float(state[CLIP_NORM][0])
        noised = dp.noisy_sum(total, clip, dp.generator(round_))
        new_state, new_params = self.inner.aggregate_sum(
            _without_clip(state), params, noised, dp.expected_clients, round_=round_
        )
        return _with_clip(new_state, clip), new_params
