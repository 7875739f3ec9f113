"""Coordinate-wise robust aggregation: median and trimmed mean (Yin et al. 2018).

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, Definitions 1 and 2: for each coordinate ``j`` independently,

* median:       ``g_j = med{u_1j, ..., u_Kj}`` (the mean of the two middle values when K is even);
* trimmed mean: ``g_j = 1 / (K - 2f) * sum of u_kj over the K - 2f values left after removing
  the f largest and the f smallest`` (the paper's ``beta = f / K``).

Both tolerate ``f`` Byzantine clients when ``K > 2f``: every kept value (and so the output) lies
between two honest values of the same coordinate. Both are unweighted, as in the paper: a client's
reported example count is no more trustworthy than its update.

Neither sorts the ``[K, D]`` matrix (a sort along K costs several seconds at D = 1e6): the trimmed
mean finds the two cut values with ``topk`` of size ``f + 1`` and sums what lies between them,
counting values equal to a cut value exactly, so ties are handled as a sort would.
"""

from __future__ import annotations

import torch

from fedguard.algorithms.robust import base as robust_base


def coordinate_median(updates: torch.Tensor, *, f: int) -> torch.Tensor:
    """Coordinate-wise median of ``updates [K, D]``; needs ``K > 2f``."""
    robust_base.check_updates(updates)
    robust_base.require_honest_majority("The coordinate-wise median", updates.shape[0], f)
    return _median(updates)


def trimmed_mean(updates: torch.Tensor, *, f: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``f`` largest and ``f`` smallest values; ``K > 2f``."""
    return trimmed_mean_reporting(updates, f=f)[0]


def trimmed_mean_reporting(updates: torch.Tensor, *, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`trimmed_mean` and, per row, the share of its coordinates that were cut (float64
    ``[K]``).

    A value counts as cut when it lies strictly below the kept range's low end or strictly
    above its high end; a value equal to a cut value counts as kept (which of several equal
    copies is dropped does not change the aggregate, so no copy is singled out). Two extra
    comparisons over the matrix: cheap beside the two ``topk`` passes.
    """
    robust_base.check_updates(updates)
    k = updates.shape[0]
    robust_base.require_honest_majority("The trimmed mean", k, f)
    if f == 0:
        return updates.mean(dim=0), torch.zeros(k, dtype=torch.float64)
    low = torch.topk(updates, f + 1, dim=0, largest=False, sorted=False).values.amax(dim=0)
    high = torch.topk(updates, f + 1, dim=0, largest=True, sorted=False).values.amin(dim=0)
    # Kept: ranks f+1 .. K-f, i.e. everything strictly between low and high plus the copies of
    # low (resp. high) that are not among the f smallest (resp. largest) values.
    inside = (updates > low) & (updates < high)
    total = torch.where(inside, updates, 0.0).sum(dim=0, dtype=torch.float64)
    n_low = (updates <= low).sum(dim=0) - f
    n_high = (updates >= high).sum(dim=0) - f
    total += n_low * low.to(torch.float64) + n_high * high.to(torch.float64)
    out = total / (k - 2 * f)
    aggregate = torch.where(low == high, low.to(torch.float64), out).to(updates.dtype)
    cut = ((updates < low) | (updates > high)).sum(dim=1, dtype=torch.float64)
    return aggregate, cut / updates.shape[1]


def mean_around_median(updates: torch.Tensor, *, keep: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``keep`` values closest to the coordinate-wise median.

    Bulyan's second step (El Mhamdi et al. 2018, Algorithm 1: ``beta`` closest to the median).
    Values tied at the cut distance (``m - d`` and ``m + d``) share the remaining places equally,
    so the result does not depend on the order of the rows.
    """
    k = updates.shape[0]
    if not 1 <= keep <= k:
        raise robust_base.RobustnessError(f"Cannot keep {keep} of {k} values per coordinate.")
    median = _median(updates)
    distance = (updates - median).abs()
    if keep == k:
        return updates.mean(dim=0)
    cut = torch.topk(distance, k - keep + 1, dim=0, largest=True, sorted=False).values.amin(dim=0)
    inside = distance < cut
    tied = distance == cut
    total = torch.where(inside, updates, 0.0).sum(dim=0, dtype=torch.float64)
    tied_sum = torch.where(tied, updates, 0.0).sum(dim=0, dtype=torch.float64)
    places = keep - inside.sum(dim=0)
    total += tied_sum * places / tied.sum(dim=0)
    return (total / keep).to(updates.dtype)


def _median(updates: torch.Tensor) -> torch.Tensor:
    k = updates.shape[0]
    lower = torch.median(updates, dim=0).values  # torch returns the lower of the two middles
    if k % 2 == 1:
        return lower
    # The upper middle value (rank K/2 + 1): ``lower`` again if it occurs past rank K/2, else
    # the smallest value above it. Two masked passes instead of a second median.
    repeated = (updates <= lower).sum(dim=0) > k // 2
    above = torch.where(updates > lower, updates, float("inf")).amin(dim=0)
    upper = torch.where(repeated, lower, above)
    return ((lower.to(torch.float64) + upper.to(torch.float64)) / 2.0).to(updates.dtype)
