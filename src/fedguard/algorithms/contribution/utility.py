"""The cooperative game of one round: a memoised, counted utility ``v(S)`` over its participants.

Every utility-based score in this package (exact Shapley, GTG-Shapley, leave-one-out) values the
same game. The players are the round's ``K`` participants, numbered ``0 .. K-1`` in the order of
the rows of the round's ``[K, D]`` update matrix, and ``v(S)`` is the utility (validation accuracy,
negative validation loss, ...) of the model the server would have produced from the updates of
the coalition ``S`` alone; ``v(empty)`` is the utility of the previous global model.

Sub-models are reconstructed from the updates that arrived, never retrained: the server applies
its own aggregation rule and optimizer step to the rows of ``S`` (:func:`from_updates`), so a
score values what the server actually does. This is the gradient-based reconstruction of Song,
Tong and Wei, "Profit Allocation for Federated Learning", IEEE Big Data 2019, on which
GTG-Shapley (Liu et al., ACM TIST 2022) builds.

A coalition's utility is computed at most once (:class:`Utility` memoises it by the coalition),
and the number of evaluations and the seconds they took are counted, so that every score reports
what it cost (:class:`Cost`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from fedguard.algorithms import finite

UtilityFn = Callable[[frozenset[int]], float]
P = TypeVar("P")


class ContributionError(ValueError):
    """A contribution score was asked for something it cannot compute as given."""


@dataclass(frozen=True)
class Cost:
    """Utility evaluations (distinct coalitions) and the seconds spent inside them."""

    evaluations: int
    seconds: float

    def since(self, earlier: Cost) -> Cost:
        """What was spent between ``earlier`` and this snapshot."""
        return Cost(self.evaluations - earlier.evaluations, self.seconds - earlier.seconds)


@dataclass(frozen=True)
class Scores:
    """One score per participant of the round (in update order) and what computing them cost.

    ``evaluations`` counts the coalitions whose utility this computation evaluated (coalitions
    already evaluated by an earlier computation on the same :class:`Utility` are free);
    ``seconds`` is the time spent in those evaluations.
    """

    values: tuple[float, ...]
    evaluations: int
    seconds: float


class Utility:
    """``v(S)`` for coalitions ``S`` of ``players`` participants: memoised, validated and counted.

    ``fn`` is called at most once per coalition; every value must be finite. ``clock`` (seconds,
    monotonic) times the calls; it is an argument so that tests can pass a fake one.
    """

    def __init__(
        self,
        fn: UtilityFn,
        players: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(players, bool) or not isinstance(players, int) or players < 1:
            raise ContributionError(
                f"A round's game needs at least one participant, got players={players!r}."
            )
        self._fn = fn
        self._players = players
        self._clock = clock
        self._memo: dict[frozenset[int], float] = {}
        self._seconds = 0.0

    @property
    def players(self) -> int:
        """The number ``K`` of participants; they are numbered ``0 .. K-1``."""
        return self._players

    def cost(self) -> Cost:
        """The evaluations made and the seconds spent so far (a snapshot)."""
        return Cost(len(self._memo), self._seconds)

    def evaluated(self, subset: frozenset[int]) -> bool:
        """Whether ``subset``'s utility is already known (asking for it again costs nothing)."""
        return subset in self._memo

    def __call__(self, subset: frozenset[int]) -> float:
        cached = self._memo.get(subset)
        if cached is not None:
            return cached
        if any(not 0 <= p < self._players for p in subset):
            raise ContributionError(
                f"Coalition {sorted(subset)} names participants outside 0..{self._players - 1}."
            )
        start = self._clock()
        value = float(self._fn(subset))
        self._seconds += self._clock() - start
        if not math.isfinite(value):
            raise ContributionError(
                f"The utility of coalition {sorted(subset)} is {value}; it must be finite."
            )
        self._memo[subset] = value
        return value


def from_updates(
    updates: torch.Tensor,
    weights: torch.Tensor,
    *,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    apply: Callable[[torch.Tensor], P],
    evaluate: Callable[[P], float],
    previous: P,
    clock: Callable[[], float] = time.perf_counter,
) -> Utility:
    """The round's game built from its updates, as the server would build each sub-model.

    ``v(S) = evaluate(apply(aggregate(updates[S], weights[S])))`` for a non-empty coalition ``S``
    (rows taken in increasing index order) and ``v(empty) = evaluate(previous)``, the previous
    global model's utility.

    * ``aggregate(updates [|S|, D], weights [|S|]) -> delta [D]``: the configured aggregation
      rule (it normalises the weights it is given, as the weighted mean does);
    * ``apply(delta) -> params``: the server optimizer's step from the round's starting model and
      state; it must not modify that state, since it is called once per coalition;
    * ``evaluate(params) -> float``: the utility, larger is better.
    """
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ContributionError(
            f"Updates must be a non-empty [K, D] matrix, got shape {tuple(updates.shape)}."
        )
    k = updates.shape[0]
    if weights.shape != (k,):
        raise ContributionError(
            f"Expected {k} weights, one per update, got shape {tuple(weights.shape)}."
        )
    if not finite.all_finite(updates):
        raise ContributionError("The updates contain NaN or infinite values.")

    def value(subset: frozenset[int]) -> float:
        if not subset:
            return float(evaluate(previous))
        rows = torch.tensor(sorted(subset), dtype=torch.long)
        return float(evaluate(apply(aggregate(updates[rows], weights[rows]))))

    return Utility(value, k, clock=clock)
