"""GTG-Shapley: Monte-Carlo Shapley values of a round's participants, with guided sampling and
two truncations.

Liu, Chen, Yu, Liu and Cui, "GTG-Shapley: Efficient and Accurate Participant Contribution
Evaluation in Federated Learning", ACM Transactions on Intelligent Systems and Technology 13(4),
2022 (arXiv 2109.02053). The Shapley value is the expected marginal contribution of
a participant over a uniformly random joining order (Castro, Gomez and Tejada 2009); GTG-Shapley
estimates it from sampled orders of one round's updates, each coalition's sub-model rebuilt from
the updates (no retraining), and saves utility evaluations three ways:

* **between-round truncation**: when ``|v(N) - v(empty)| < round_tolerance`` the round moved the
  model too little to divide; every participant scores 0 and no permutation is walked
  (``skipped``);
* **within-round truncation**: a permutation's walk stops once ``|v(N) - v(prefix)| <
  walk_tolerance``; the participants after that point are credited 0 for this permutation
  (the truncated Monte Carlo of Ghorbani and Zou, "Data Shapley", ICML 2019);
* **guided sampling**: permutations come in cycles of ``K``; the ``j``-th permutation of a cycle
  puts participant ``j`` first and the others in a uniformly random order, so that every
  participant's marginal contribution to the early, most informative coalitions is sampled
  equally often.

A coalition met again in a later permutation costs nothing (:class:`utility.Utility` memoises).
``phi_i`` is the running mean of participant ``i``'s marginal contributions over the permutations
walked. Sampling stops after a whole cycle once at least ``min_cycles`` cycles are done and the
estimates have settled: for each of the last ``window`` permutations ``t``,
``||phi(t) - phi(now)||_1 / ||phi(now)||_1 < convergence_tolerance``: the relative change of the
running means, measured on the vector as a whole rather than averaged over participants
(``|phi_i(t) - phi_i(now)| / |phi_i(now)|``), so that a null participant (``phi_i`` near 0) does
not hold sampling open forever. ``max_cycles`` caps the cost at ``2 + max_cycles * K * (K - 1)``
evaluations whatever happens. The default tolerance, 0.1, was chosen from the measured frontier
of ``benchmarks/contribution.py`` (the medical example, 8 clients per round): the loosest
tolerance of those measured whose per-round correlation with exact Shapley kept a margin above
Pearson 0.95 and Spearman 0.9 (0.980 and 0.954), at about 70% of exact Shapley's evaluations
where 0.02 needed 97%; 0.2 cut that to 55% but sat at the edge (0.967 and 0.938). 0.01 is what
the tests' accuracy bounds use.

**Evaluation budget** (``max_evaluations``, not in the paper, which bounds only the number of
permutations): the estimate never costs more than ``max_evaluations`` new utility evaluations,
``v(empty)`` and ``v(N)`` included. A permutation whose walk would need an evaluation beyond the
budget is abandoned before that evaluation (its partial marginals are dropped, so every
permutation averaged was walked to its end or to its within-round truncation) and sampling ends
(``budget_exhausted``); coalitions already evaluated are free and never count against it. The
budget must cover one whole walk, ``K + 1`` evaluations. With a budget, sampling can end
inside a cycle, so the last cycle's leads are not all sampled equally often.

The tolerances are in the utility's own units (for validation accuracy, ``1e-3`` is a tenth of a
percentage point); 0 turns a truncation off. Each permutation draws ``K - 1`` indices from the
``generator`` passed in, whatever the truncations do, so that the same seed walks the same
permutations with and without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedguard.algorithms.contribution import utility as contribution_utility


@dataclass(frozen=True)
class GtgConfig:
    """GTG-Shapley's tolerances and sampling limits (tolerances in units of the utility)."""

    round_tolerance: float = 1e-3  # between rounds: skip when |v(N) - v(empty)| is below this
    walk_tolerance: float = 1e-3  # within a round: stop a walk when |v(N) - v(prefix)| is below
    convergence_tolerance: float = 0.1  # relative L1 change of the estimates over `window`
    window: int = 10  # permutations the convergence test looks back over
    min_cycles: int = 3  # cycles of K permutations walked before testing convergence
    max_cycles: int = 30  # hard cap on the permutations walked: max_cycles * K
    max_evaluations: int | None = None  # hard cap on new utility evaluations (None: no cap)

    def __post_init__(self) -> None:
        for name in ("round_tolerance", "walk_tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise contribution_utility.ContributionError(
                    f"GTG-Shapley's {name} must be finite and >= 0, got {value}."
                )
        if not (math.isfinite(self.convergence_tolerance) and self.convergence_tolerance > 0):
            raise contribution_utility.ContributionError(
                "GTG-Shapley's convergence_tolerance must be positive, got "
                f"{self.convergence_tolerance}."
            )
        if self.window < 1:
            raise contribution_utility.ContributionError(
                f"GTG-Shapley's window must be at least 1 permutation, got {self.window}."
            )
        if not 1 <= self.min_cycles <= self.max_cycles:
            raise contribution_utility.ContributionError(
                "GTG-Shapley needs 1 <= min_cycles <= max_cycles, got "
                f"{self.min_cycles} and {self.max_cycles}."
            )
        budget = self.max_evaluations
        if budget is not None and (isinstance(budget, bool) or budget < 3):
            raise contribution_utility.ContributionError(
                "GTG-Shapley's max_evaluations must be at least 3 (v(empty), v(N) and one "
                f"coalition), got {budget!r}."
            )


@dataclass(frozen=True)
class GtgScores:
    """GTG-Shapley's estimates (in update order), their cost and how sampling ended.

    ``skipped``: the round fell under between-round truncation (all values 0, no permutation).
    ``converged``: sampling stopped on the convergence test rather than at ``max_cycles`` or on
    the budget (true for a skipped round). ``budget_exhausted``: sampling stopped because the
    next permutation needed an evaluation beyond ``max_evaluations``.
    """

    values: tuple[float, ...]
    evaluations: int
    seconds: float
    permutations: int
    converged: bool
    skipped: bool
    budget_exhausted: bool = False


def shapley(
    utility: contribution_utility.Utility,
    *,
    generator: torch.Generator,
    config: GtgConfig,
) -> GtgScores:
    """Estimate every participant's Shapley value in ``utility``'s game, as the paper does.

    Deterministic given the generator's state; it consumes ``K - 1`` draws per permutation.
    Refuses a ``max_evaluations`` below ``K + 1``, the cost of one whole walk.
    """
    k = utility.players
    budget = config.max_evaluations
    if budget is not None and budget < k + 1:
        raise contribution_utility.ContributionError(
            f"GTG-Shapley's max_evaluations={budget} cannot pay for one permutation of {k} "
            f"participants ({k + 1} evaluations: v(empty), v(N) and {k - 1} coalitions between)."
        )
    start = utility.cost()
    everyone = frozenset(range(k))
    v_empty = utility(frozenset())
    v_full = utility(everyone)
    if abs(v_full - v_empty) < config.round_tolerance:
        spent = utility.cost().since(start)
        return GtgScores((0.0,) * k, spent.evaluations, spent.seconds, 0, True, True)

    # Evaluations left to spend (None: unbounded); v(empty) and v(N) count when they were new.
    left = None if budget is None else budget - utility.cost().since(start).evaluations
    totals = [0.0] * k
    history: list[tuple[float, ...]] = []
    converged = exhausted = False
    for cycle in range(config.max_cycles):
        for lead in range(k):
            order = _guided_order(lead, k, generator)
            walked = _walk(utility, order, v_empty, v_full, config.walk_tolerance, left)
            if walked is None:
                exhausted = True
                break
            marginals, spent_here = walked
            if left is not None:
                left -= spent_here
            totals = [t + m for t, m in zip(totals, marginals, strict=True)]
            history.append(tuple(t / (len(history) + 1) for t in totals))
        if exhausted:
            break
        if cycle + 1 >= config.min_cycles and _settled(history, config):
            converged = True
            break
    spent = utility.cost().since(start)
    return GtgScores(
        history[-1], spent.evaluations, spent.seconds, len(history), converged, False, exhausted
    )


def _guided_order(lead: int, k: int, generator: torch.Generator) -> list[int]:
    """``lead`` first, then the other participants in a uniformly random order."""
    rest = [p for p in range(k) if p != lead]
    return [lead] + [rest[j] for j in torch.randperm(k - 1, generator=generator).tolist()]


def _walk(
    utility: contribution_utility.Utility,
    order: list[int],
    v_empty: float,
    v_full: float,
    tolerance: float,
    left: int | None,
) -> tuple[list[float], int] | None:
    """Each participant's marginal contribution along ``order`` (indexed by participant) and
    the new evaluations the walk made; None, before any evaluation beyond them, when it would
    need more than ``left`` new evaluations (None: no limit)."""
    marginals = [0.0] * len(order)
    before = v_empty
    prefix: set[int] = set()
    fresh = 0
    for p in order:
        if abs(v_full - before) < tolerance:
            break  # within-round truncation: the rest of the order is credited 0
        prefix.add(p)
        coalition = frozenset(prefix)
        if not utility.evaluated(coalition):
            if left is not None and fresh >= left:
                return None  # over budget: the permutation is abandoned
            fresh += 1
        value = utility(coalition)
        marginals[p] = value - before
        before = value
    return marginals, fresh


def _settled(history: list[tuple[float, ...]], config: GtgConfig) -> bool:
    """Whether the last ``window`` running means all lie within the relative tolerance."""
    if len(history) <= config.window:
        return False
    now = history[-1]
    scale = math.fsum(abs(x) for x in now)
    for past in history[-1 - config.window : -1]:
        change = math.fsum(abs(a - b) for a, b in zip(past, now, strict=True))
        if change > 0 and (scale == 0 or change / scale >= config.convergence_tolerance):
            return False
    return True
