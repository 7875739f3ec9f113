"""The model the server would have built from a coalition of a round's replies (the server half
of contribution scores, :mod:`fedguard.algorithms.contribution`).

A coalition's sub-model is what :meth:`Strategy.aggregate` returns for the coalition's replies
from the round's starting parameters and state. Strategies are pure functions of their state
(they return the next state and never change the one given), so the round's state is not
advanced however many coalitions are evaluated, and the configured aggregator and server
optimizer (FedAvgM's momentum, FedAdam's moments) apply to every coalition as they do to the
round. Two cases differ from the round itself, on purpose:

* central DP (:class:`~fedguard.protocol.central_dp.CentralPrivacy`): the sub-model is built
  from the server-clipped updates, summed over the same fixed denominator, *before* the
  Gaussian noise: noise would make every coalition's utility a draw of the noise and the
  scores would measure it. The scores are then computed from the clipped updates the server
  holds, not from the released model, and are not themselves differentially private.
* a robust rule that refuses a coalition too small for it (Krum needs more than ``2f + 2``
  updates, Bulyan ``4f + 3``): the coalition's sub-model is the server optimizer's step with the
  mean of its updates (each weighing one, as the rule weighs them), so that ``v(S)`` is defined
  for every coalition. The large coalitions, including the whole round, use the rule itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedguard.algorithms.optimizers import aggregation
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.protocol import fedopt, messages
from fedguard.protocol.central_dp import CentralPrivacy
from fedguard.protocol.strategy import CLIP_NORM, ServerState, Strategy, StrategyState


class CoalitionError(ValueError):
    """No sub-model can be built for this strategy and coalition."""


def sub_model(
    strategy: Strategy,
    state: StrategyState,
    params: torch.Tensor,
    replies: Sequence[messages.FitReply],
    *,
    round_: int,
) -> torch.Tensor:
    """The parameters ``strategy`` would produce in ``round_`` from ``replies`` alone (a
    non-empty coalition of the round's accepted replies), without changing ``state``."""
    if not replies:
        raise CoalitionError(
            "An empty coalition has no sub-model: its utility is the previous model's."
        )
    if isinstance(strategy, CentralPrivacy):
        return _clipped_without_noise(strategy, state, params, replies, round_)
    rule = strategy.aggregator
    if rule is not None and rule.needs_individual_updates:
        if not rule.condition(len(replies), 0).holds:
            return _mean_step(strategy, state, params, replies)
        try:
            return strategy.aggregate(state, params, replies, round_=round_)[1]
        except ValueError:  # the rule refuses this many updates for its configured f
            return _mean_step(strategy, state, params, replies)
    return strategy.aggregate(state, params, replies, round_=round_)[1]


def _mean_step(
    strategy: Strategy,
    state: StrategyState,
    params: torch.Tensor,
    replies: Sequence[messages.FitReply],
) -> torch.Tensor:
    """The server optimizer's step with the equally weighted mean of the coalition's updates."""
    inner = strategy.inner if isinstance(strategy, fedopt.Scaffold) else strategy
    if not isinstance(inner, fedopt.FedOpt):
        raise CoalitionError(
            f"A coalition of {len(replies)} updates is too small for the aggregator of "
            f"{type(strategy).__name__}, and that strategy has no plain mean step to fall back on."
        )
    updates = torch.stack([r.update for r in replies])
    delta = aggregation.weighted_mean(updates, torch.ones(len(replies), dtype=torch.float64))
    return inner.step(ServerState.of(state), params, delta)[1]


def _clipped_without_noise(
    strategy: CentralPrivacy,
    state: StrategyState,
    params: torch.Tensor,
    replies: Sequence[messages.FitReply],
    round_: int,
) -> torch.Tensor:
    """Central DP's aggregate of the coalition, server-clipped as the round is, with no noise."""
    bound = float(state[CLIP_NORM][0])
    rule = strategy.inner.aggregator
    if rule is not None and rule.norm_bound is not None:
        bound = min(bound, rule.norm_bound)
    total = torch.stack([dp_fedavg.clip_update(r.update, bound).update for r in replies])
    inner_state: StrategyState = (
        state
        if isinstance(state, ServerState)
        else {k: v for k, v in state.items() if k != CLIP_NORM}
    )
    _, new_params = strategy.inner.aggregate_sum(
        inner_state,
        params,
        total.double().sum(0),
        strategy.dp.expected_clients,
        round_=round_,
    )
    return new_params
