"""Exact Shapley values of a round's participants, by enumerating every coalition.

Shapley, "A Value for n-Person Games", Contributions to the Theory of Games II, 1953: participant
``i`` of a game ``v`` on ``N = {0, .., K-1}`` receives

    phi_i = sum over S in N \\ {i} of  |S|! (K - |S| - 1)! / K!  *  (v(S + {i}) - v(S)),

its marginal contribution averaged over every order in which the participants could join. It is
the only division with efficiency (``sum_i phi_i = v(N) - v(empty)``), symmetry (interchangeable
participants get equal shares), the null-player property (a participant that changes no
coalition's utility gets 0) and additivity over games.

All ``2^K`` coalitions are evaluated, each a sub-model built from the round's updates (see
:mod:`fedguard.algorithms.contribution.utility`). Above :data:`MAX_PLAYERS` participants (4096
evaluations) this is refused; GTG-Shapley (:mod:`fedguard.algorithms.contribution.gtg`) estimates
the same values from far fewer.
"""

from __future__ import annotations

import math

from fedguard.algorithms.contribution import utility as contribution_utility

MAX_PLAYERS = 12


def exact(utility: contribution_utility.Utility) -> contribution_utility.Scores:
    """The Shapley value of every participant of ``utility``'s game; ``K <= MAX_PLAYERS``.

    Evaluates all ``2^K`` coalitions (those already evaluated on ``utility`` are free) and sums
    each participant's weighted marginal contributions with ``math.fsum``.
    """
    k = utility.players
    if k > MAX_PLAYERS:
        raise contribution_utility.ContributionError(
            f"Exact Shapley values enumerate all 2^K coalitions; K={k} participants is above the "
            f"limit of {MAX_PLAYERS} (2^{MAX_PLAYERS} = {1 << MAX_PLAYERS} utility evaluations). "
            "Use GTG-Shapley for larger rounds."
        )
    start = utility.cost()
    values = [utility(_members(mask)) for mask in range(1 << k)]
    # weight[s] = s! (K - s - 1)! / K!, the probability that a given participant joins exactly
    # after a given coalition of size s, for s = 0 .. K-1.
    weight = [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]
    phi = []
    for i in range(k):
        bit = 1 << i
        phi.append(
            math.fsum(
                weight[mask.bit_count()] * (values[mask | bit] - values[mask])
                for mask in range(1 << k)
                if not mask & bit
            )
        )
    spent = utility.cost().since(start)
    return contribution_utility.Scores(tuple(phi), spent.evaluations, spent.seconds)


def _members(mask: int) -> frozenset[int]:
    return frozenset(i for i in range(mask.bit_length()) if mask >> i & 1)
