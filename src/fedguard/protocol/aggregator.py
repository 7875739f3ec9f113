"""The public ``Aggregator`` protocol: how the updates of a round become one update.

An aggregator is a pure function of the cohort's updates ``[K, D]`` and their weights ``[K]`` to
one ``[D]`` vector, with optional state carried from round to round (centered clipping's
reference point), which the run checkpoints as named tensors. It also states what it needs, and
every configuration is checked against those statements before round 1, for fedguard's rules
and a user's alike (:mod:`fedguard.experiment.config_checks`):

* :meth:`Aggregator.condition`: whether its guarantee holds with ``K`` updates of which ``f``
  are Byzantine, with the condition in words (Krum: ``K > 2f + 2``). The run refuses a
  ``server.byzantine_f`` or a cohort that breaks it.
* ``needs_individual_updates``: whether it must see each update. Secure aggregation reveals only
  the sum and central DP's noise is calibrated for the mean, so such a rule runs with neither.
  A rule that does not need them must be the mean of the updates after each is clipped to its
  ``norm_bound`` (weighted as below), since that is all a sum can give.
* ``norm_bound``: a bound it applies to each update on its own. Under secure aggregation the
  clients apply it before masking; under central DP the server's clip takes the smaller of the
  two.
* ``weighs_by_examples``: whether the clients' claimed example counts weigh their updates. Only
  FedAvg's mean does; a robust rule gives every update the same weight, so that a claimed size
  buys no influence (see :mod:`fedguard.protocol.strategy`).

A rule that picks whole updates can also say which it left out
(:meth:`Aggregator.aggregate_reporting`, a :class:`RuleReport`); the strategy turns the rows into
client ids (:class:`LeftOut`) for the round's metrics and the live view.

The strategy calls :meth:`Aggregator.aggregate` once per round where FedAvg would take the
weighted mean, so FedAvgM, FedAdam, FedYogi and FedAdagrad run unchanged on top of any rule.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedguard.algorithms.optimizers import aggregation

AggregatorState = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Condition:
    """Whether an aggregator's guarantee holds for one ``(K, f)``, and the condition in words.

    ``reason`` states the requirement in ``K`` (updates) and ``f`` (Byzantine ones), e.g.
    ``"K > 2f + 2"``; refusals quote it ("it needs K > 2f + 2, so f <= 3").
    """

    holds: bool
    reason: str


@dataclass(frozen=True)
class RoundContext:
    """What an aggregator may know about the round besides the updates.

    ``params`` are the global parameters ``[D]`` every update of the round starts from (a rule
    that computes its own reference update, as FLTrust does, trains from them); ``generator`` is
    seeded per (run seed, round), so that a resumed run aggregates as an uninterrupted one.
    """

    round: int
    params: torch.Tensor
    generator: torch.Generator


@dataclass(frozen=True)
class RuleReport:
    """What a rule says of one round's updates besides their aggregate, by row of ``[K, D]``.

    ``selects``: whether the rule picks whole updates (else an empty ``excluded`` means it
    leaves none out by design). ``excluded``: the rows that took no part in the aggregate.
    ``trimmed``: each row's share of coordinates a coordinate-wise trim cut, or None.
    """

    rule: str
    selects: bool
    excluded: tuple[int, ...] = ()
    trimmed: tuple[float, ...] | None = None

    def by_client(self, client_ids: Sequence[int]) -> LeftOut:
        """The report with each row named by its client (``client_ids[row]``)."""
        return LeftOut(
            self.rule,
            self.selects,
            tuple(int(c) for c in client_ids),
            tuple(sorted(self.excluded)),
            self.trimmed,
        )


@dataclass(frozen=True)
class LeftOut:
    """A :class:`RuleReport` with each row's client: ``rows`` names the client of each
    aggregated update, in order (a client appears twice when two of its replies were in one
    asynchronous buffer); ``excluded`` and ``trimmed`` are by row, as in the report."""

    rule: str
    selects: bool
    rows: tuple[int, ...]
    excluded: tuple[int, ...] = ()
    trimmed: tuple[float, ...] | None = None

    @property
    def clients(self) -> tuple[int, ...]:
        """The clients whose update the rule left out, ascending (once per update)."""
        return tuple(sorted(self.rows[r] for r in self.excluded))

    def trimmed_by_client(self) -> dict[int, float] | None:
        """Each client's share of coordinates cut (the mean over its updates), or None."""
        if self.trimmed is None:
            return None
        shares: dict[int, list[float]] = {}
        for cid, share in zip(self.rows, self.trimmed, strict=True):
            shares.setdefault(cid, []).append(share)
        return {cid: sum(v) / len(v) for cid, v in shares.items()}

    def row_verdicts(self) -> list[tuple[bool, float | None]]:
        """Per row: whether its update was left out, and its share of coordinates cut."""
        out = set(self.excluded)
        return [
            (row in out, None if self.trimmed is None else self.trimmed[row])
            for row in range(len(self.rows))
        ]

    def metrics(self) -> dict[str, object]:
        """The fields a round's metrics row carries: ``robust_rule``, ``clients_left_out`` (a
        count; None for a rule that picks no whole update), ``left_out_clients`` (their ids) and
        ``trimmed_share`` (client id to share, for a trimming rule; None for the others)."""
        trimmed = self.trimmed_by_client()
        return {
            "robust_rule": self.rule,
            "clients_left_out": len(self.clients) if self.selects else None,
            "left_out_clients": list(self.clients),
            "trimmed_share": None
            if trimmed is None
            else {str(c): round(v, 6) for c, v in sorted(trimmed.items())},
        }


class Aggregator(abc.ABC):
    """Combine the ``K`` updates of a round into one.

    Subclasses implement :meth:`condition` and :meth:`aggregate`, and set the class attributes
    that differ from the defaults below (the defaults suit a robust rule that compares
    updates). ``name`` is what error messages call the rule (default: the class name).
    """

    name: str = ""
    needs_individual_updates: bool = True
    weighs_by_examples: bool = False
    norm_bound: float | None = None

    @abc.abstractmethod
    def condition(self, n: int, f: int) -> Condition:
        """Whether the guarantee holds with ``n`` updates of which ``f`` are Byzantine.

        It must be monotone: true for ``(n, f)``, it stays true for more updates or fewer
        Byzantine ones (the checks search ``n`` and ``f`` by bisection).
        """

    def init(self, dim: int) -> AggregatorState:
        """The state before the first round, for updates of length ``dim`` (none by default)."""
        return {}

    @abc.abstractmethod
    def aggregate(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: AggregatorState,
        context: RoundContext,
    ) -> tuple[AggregatorState, torch.Tensor]:
        """The new state and the aggregate ``[D]`` (float32) of ``updates [K, D]``.

        ``weights [K]`` are the example counts when ``weighs_by_examples``, else ones.
        """

    def aggregate_reporting(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: AggregatorState,
        context: RoundContext,
    ) -> tuple[AggregatorState, torch.Tensor, RuleReport | None]:
        """:meth:`aggregate` and what the rule left out (None: it does not say). Rules that
        select among the updates override this and have :meth:`aggregate` call it."""
        new_state, out = self.aggregate(updates, weights, state=state, context=context)
        return new_state, out, None


def label(aggregator: Aggregator) -> str:
    """What messages call ``aggregator``: its ``name``, else its class name."""
    return aggregator.name or type(aggregator).__name__


class Mean(Aggregator):
    """FedAvg's example-weighted mean (McMahan et al. 2017): it tolerates no Byzantine update.

    It needs only the sum, so it runs under secure aggregation and central DP.
    """

    name = "mean"
    needs_individual_updates = False
    weighs_by_examples = True

    def condition(self, n: int, f: int) -> Condition:
        return Condition(n >= 1 and f == 0, "f = 0 (one update can move the mean anywhere)")

    def aggregate(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: AggregatorState,
        context: RoundContext,
    ) -> tuple[AggregatorState, torch.Tensor]:
        return state, aggregation.weighted_mean(updates, weights)


def most_tolerated(aggregator: Aggregator, n: int) -> int:
    """The largest ``f`` in ``0..n`` for which the condition holds with ``n`` updates; -1 when
    it does not hold even for ``f = 0``."""
    if not aggregator.condition(n, 0).holds:
        return -1
    low, high = 0, n  # holds at low; search the last f that holds
    while low < high:
        middle = (low + high + 1) // 2
        if aggregator.condition(n, middle).holds:
            low = middle
        else:
            high = middle - 1
    return low


def fewest_updates(aggregator: Aggregator, f: int, most: int) -> int | None:
    """The fewest updates ``K`` in ``1..most`` with which the condition holds for ``f``; None if
    even ``most`` are too few."""
    if most < 1 or not aggregator.condition(most, f).holds:
        return None
    low, high = 1, most  # holds at high; search the first n that holds
    while low < high:
        middle = (low + high) // 2
        if aggregator.condition(middle, f).holds:
            high = middle
        else:
            low = middle + 1
    return low
