"""Leave-one-out: what the round's model loses when one participant's update is left out.

``loo_i = v(N) - v(N \\ {i})`` for each participant ``i`` of the round's game (for a round of one
participant, ``v(N) - v(empty)``). ``K + 1`` utility evaluations. The classical baseline that
Ghorbani and Zou, "Data Shapley: Equitable Valuation of Data for Machine Learning", ICML 2019,
compare the Shapley value against: cheap, but two participants that send the same information
each score about zero, since either one alone makes up for the other.
"""

from __future__ import annotations

from fedguard.algorithms.contribution import utility as contribution_utility


def leave_one_out(utility: contribution_utility.Utility) -> contribution_utility.Scores:
    """``v(N) - v(N \\ {i})`` for every participant ``i``, in update order."""
    start = utility.cost()
    everyone = frozenset(range(utility.players))
    full = utility(everyone)
    values = tuple(full - utility(everyone - {i}) for i in range(utility.players))
    spent = utility.cost().since(start)
    return contribution_utility.Scores(values, spent.evaluations, spent.seconds)
