"""The one-run privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing
with One (1) Training Run"): an empirical lower bound on epsilon from guesses about canaries.

``m`` canaries are each included in the training run independently with probability 1/2. After
training, the auditor scores every canary, guesses "included" for the ``k_plus`` highest scores
and "excluded" for the ``k_minus`` lowest, and abstains on the rest. If the run is
``(epsilon, delta)``-DP with respect to each canary, the number ``V`` of correct guesses among
the ``r = k_plus + k_minus`` guesses satisfies (the paper's Theorem 3.1 with its delta term, as
computed by its Algorithm in the appendix)

    P[V >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{i=1..v} P[v > Binomial(r, q) >= v - i] / i,

with ``q = e^epsilon / (1 + e^epsilon)``, the accuracy of epsilon-DP randomized response. The
lower bound at confidence ``1 - p`` is the largest epsilon whose right-hand side stays below
``p`` for the observed ``v``: a run that were ``(epsilon, delta)``-DP for any larger epsilon
would give so many correct guesses with probability below ``p``.

The auditor may try several guess counts; :func:`audit` tries a fixed grid and splits the
failure probability ``p`` evenly over it (a union bound), so the reported maximum keeps its
confidence. Pure functions of numbers and arrays: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Shares of the canaries guessed on (half "included", half "excluded"): few, confident guesses
# give the strongest bound when the signal is weak, many when it is strong.
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BISECTION_STEPS = 40


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """An upper bound on the probability of ``v`` or more correct guesses out of ``r`` (among
    ``m`` canaries) when the run is ``(epsilon, delta)``-DP for each canary (the module's
    inequality)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"Need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # P[v > Binomial(r, q) >= v - i] for i = 1..v: cumulative sums of the pmf below v.
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon at which ``v`` correct guesses out of ``r`` have probability below
    ``p`` (so with confidence ``1 - p`` the run is not ``(epsilon, delta)``-DP for any smaller
    epsilon); 0 when even epsilon = 0 explains them. Bisection on :func:`p_value`, which
    grows with epsilon."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}.")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        low, high = high, 2.0 * high
        if high > 1e4:  # v = r with very many guesses: the bound is beyond any useful epsilon
            return low
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


def correct_guesses(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """Guess "included" for the ``k_plus`` highest ``scores`` and "excluded" for the ``k_minus``
    lowest; return ``(r, v)``: the guesses made and how many were right. Ties are broken by a
    stable sort, so the result depends on the scores alone."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be vectors of the same length.")
    m = scores.shape[0]
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"Need k_plus, k_minus >= 0 with k_plus + k_minus <= {m}.")
    order = np.argsort(scores, kind="stable")
    top = order[m - k_plus :] if k_plus else order[:0]
    bottom = order[:k_minus]
    v = int(included[top].sum()) + int((~included[bottom]).sum())
    return k_plus + k_minus, v


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the guess counts tried: ``epsilon_lower_bound`` at ``confidence``,
    from ``correct`` right guesses out of ``guesses`` (``k_plus`` "included", ``k_minus``
    "excluded") among ``canaries``; ``tried`` guess counts shared the failure probability."""

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    tried: int


def audit(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    confidence: float = 0.95,
    shares: Sequence[float] = GUESS_SHARES,
) -> AuditResult:
    """The empirical epsilon lower bound of canaries with these ``scores`` (higher: more likely
    included) and true inclusion bits ``included``, at ``confidence``: the maximum over guess
    counts ``r = share * m`` (half guesses of each kind) of :func:`epsilon_lower_bound`, each at
    failure probability ``(1 - confidence) / len(shares)`` so the maximum keeps the
    confidence."""
    scores = np.asarray(scores, dtype=np.float64)
    m = int(scores.shape[0])
    if m < 2:
        raise ValueError(f"The audit needs at least 2 canaries, got {m}.")
    if not np.isfinite(scores).all():
        raise ValueError("Every canary score must be finite.")
    counts = sorted({max(2, min(m, round(s * m))) for s in shares})
    p = (1.0 - confidence) / len(counts)
    best: AuditResult | None = None
    for r in counts:
        k_plus, k_minus = r - r // 2, r // 2
        r_, v = correct_guesses(scores, included, k_plus, k_minus)
        eps = epsilon_lower_bound(m, r_, v, delta, p)
        if best is None or eps > best.epsilon_lower_bound:
            best = AuditResult(eps, m, r_, v, k_plus, k_minus, confidence, delta, len(counts))
    if best is None:
        raise ValueError("No guess count to try.")
    return best
