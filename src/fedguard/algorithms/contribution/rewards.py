"""Divide a reward among participants in proportion to their (cumulative) contribution scores.

Shapley-based incentive schemes pay each participant a share of a budget proportional to its
value (Song, Tong and Wei, "Profit Allocation for Federated Learning", IEEE Big Data 2019; Liu et
al., GTG-Shapley, ACM TIST 2022). Two departures from a plain proportional split make
it usable as a payment:

* negative scores are clipped at 0: a participant that hurt the model is paid nothing for its
  score (it is not charged either; flagging and exclusion are :mod:`free_riders`' business);
* a ``floor``: the fraction ``floor`` of the total is divided equally among all participants
  before the rest is divided by score, so that every participant named is paid at least
  ``floor * total / n`` for taking part, whatever its score (``floor = 0``: purely proportional;
  ``floor = 1``: equal shares).

The shares always sum to the total: when no participant has a positive score, the part that
would have followed the scores is divided equally too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as contribution_utility


def split(scores: Mapping[int, float], total: float, *, floor: float) -> dict[int, float]:
    """Each participant's share of ``total`` (client id -> amount), summing to ``total``.

    ``share_i = floor * total / n + (1 - floor) * total * max(s_i, 0) / sum_j max(s_j, 0)`` for
    the ``n`` participants named in ``scores``; if every ``max(s_j, 0)`` is 0, the second term is
    ``(1 - floor) * total / n`` for everyone.
    """
    if not scores:
        raise contribution_utility.ContributionError("Cannot split a reward among no participants.")
    if not (math.isfinite(total) and total >= 0):
        raise contribution_utility.ContributionError(
            f"The reward to split must be finite and >= 0, got {total}."
        )
    if not (math.isfinite(floor) and 0.0 <= floor <= 1.0):
        raise contribution_utility.ContributionError(
            f"The floor is a fraction of the total in [0, 1], got {floor}."
        )
    for client, score in scores.items():
        contribution_ledger.check_client(client)
        if not math.isfinite(score):
            raise contribution_utility.ContributionError(
                f"Client {client}'s score is {score}; scores must be finite."
            )
    n = len(scores)
    clipped = {c: max(float(s), 0.0) for c, s in scores.items()}
    mass = math.fsum(clipped.values())
    equal = floor * total / n
    by_score = (1.0 - floor) * total
    if mass == 0.0:
        return {c: equal + by_score / n for c in scores}
    return {c: equal + by_score * s / mass for c, s in clipped.items()}
