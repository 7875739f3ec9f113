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
evaluations whatever happens. The default tolerance, 0.02, trades accuracy for evaluations; 0.01
roughly doubles the permutations walked and is what the tests' accuracy bounds use.

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
    convergence_tolerance: float = 0.02  # relative L1 change of the estimates over `window`
    window: int = 10  # permutations the convergence test looks back over
    min_cycles: int = 3  # cycles of K permutations walked before testing convergence
    max_cycles: int = 30  # hard cap on the permutations walked: max_cycles * K

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


@dataclass(frozen=True)
class GtgScores:
    """GTG-Shapley's estimates (in update order), their cost and how sampling ended.

    ``skipped``: the round fell under between-round truncation (all values 0, no permutation).
    ``converged``: sampling stopped on the convergence test rather than at ``max_cycles``
    (true for a skipped round).
    """

    values: tuple[float, ...]
    evaluations: int
    seconds: float
    permutations: int
    converged: bool
    skipped: bool


def shapley(
    utility: contribution_utility.Utility,
    *,
    generator: torch.Generator,
    config: GtgConfig,
) -> GtgScores:
    """Estimate every participant's Shapley value in ``utility``'s game, as the paper does.

    Deterministic given the generator's state; it consumes ``K - 1`` draws per permutation.
    """
    k = utility.players
    start = utility.cost()
    everyone = frozenset(range(k))
    v_empty = utility(frozenset())
    v_full = utility(everyone)
    if abs(v_full - v_empty) < config.round_tolerance:
        spent = utility.cost().since(start)
        return GtgScores((0.0,) * k, spent.evaluations, spent.seconds, 0, True, True)

    totals = [0.0] * k
    history: list[tuple[float, ...]] = []
    converged = False
    for cycle in range(config.max_cycles):
        for lead in range(k):
            order = _guided_order(lead, k, generator)
            marginals = _walk(utility, order, v_empty, v_full, config.walk_tolerance)
            totals = [t + m for t, m in zip(totals, marginals, strict=True)]
            history.append(tuple(t / (len(history) + 1) for t in totals))
        if cycle + 1 >= config.min_cycles and _settled(history, config):
            converged = True
            break
    spent = utility.cost().since(start)
    return GtgScores(history[-1], spent.evaluations, spent.seconds, len(history), converged, False)


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
) -> list[float]:
    """Each participant's marginal contribution along ``order`` (indexed by participant)."""
    marginals = [0.0] * len(order)
    before = v_empty
    prefix: set[int] = set()
    for p in order:
        if abs(v_full - before) < tolerance:
            break  # within-round truncation: the rest of the order is credited 0
        prefix.add(p)
        value = utility(frozenset(prefix))
        marginals[p] = value - before
        before = value
    return marginals


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
