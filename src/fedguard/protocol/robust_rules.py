"""fedguard's Byzantine-robust rules as :class:`~fedguard.protocol.aggregator.Aggregator` objects.

The math is :mod:`fedguard.algorithms.robust` (Krum, Multi-Krum, the median, the trimmed mean,
Bulyan, the geometric median, centered clipping, norm bounding, each optionally on bucket means);
this module gives each configured rule the protocol a user's rule implements too: its condition
on ``(K, f)``, whether it must see individual updates, its per-update norm bound and its state
(centered clipping's reference point, checkpointed as ``robust.reference``).
"""

from __future__ import annotations

import torch

from fedguard.algorithms import robust
from fedguard.protocol.aggregator import (
    Aggregator,
    AggregatorState,
    Condition,
    RoundContext,
    RuleReport,
)

REFERENCE = "reference"  # centered clipping's reference point in the aggregator state

# The condition on K updates and f Byzantine ones under which each rule's guarantee holds.
CONDITIONS: dict[robust.RobustAggregator, str] = {
    k: "K > 2f + 2"
    if k in (robust.RobustAggregator.KRUM, robust.RobustAggregator.MULTI_KRUM)
    else "K >= 4f + 3"
    if k is robust.RobustAggregator.BULYAN
    else "K > 2f"
    for k in robust.RobustAggregator
}


class RobustRule(Aggregator):
    """One of :class:`~fedguard.algorithms.robust.RobustAggregator`, configured.

    Every update weighs the same (the strategy passes ones): see :mod:`fedguard.algorithms.robust`.
    """

    def __init__(self, config: robust.RobustConfig) -> None:
        self.config = config
        self.name = str(config.kind)
        self.needs_individual_updates = robust.needs_individual_updates(config.kind)
        bounding = config.kind is robust.RobustAggregator.NORM_BOUNDING
        self.norm_bound = config.norm_bound if bounding else None

    def condition(self, n: int, f: int) -> Condition:
        reason = CONDITIONS[self.config.kind]
        if self.config.bucket_size > 1:
            reason += f" on K = ceil(clients / {self.config.bucket_size}) bucket means"
        most = robust.max_byzantine(self.config.kind, n, self.config.bucket_size)
        return Condition(0 <= f <= most, reason)

    def init(self, dim: int) -> AggregatorState:
        return {REFERENCE: robust.init(self.config, dim).reference}

    def aggregate(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: AggregatorState,
        context: RoundContext,
    ) -> tuple[AggregatorState, torch.Tensor]:
        new_state, out, _ = self.aggregate_reporting(updates, weights, state=state, context=context)
        return new_state, out

    def aggregate_reporting(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: AggregatorState,
        context: RoundContext,
    ) -> tuple[AggregatorState, torch.Tensor, RuleReport]:
        """The aggregate and the rule's :class:`~fedguard.algorithms.robust.Selection` by row."""
        reference = state.get(REFERENCE, torch.zeros(0, dtype=torch.float32))
        new, out, selection = robust.apply_selecting(
            self.config, robust.RobustState(reference), updates, weights, round_=context.round
        )
        report = RuleReport(self.name, selection.selects, selection.excluded, selection.trimmed)
        return {**state, REFERENCE: new.reference}, out, report
