"""The cheap proxy: cosine similarity of each client's update to the round's aggregate.

``cos_k = <u_k, g> / (||u_k|| ||g||)`` for updates ``u_k`` (rows of ``[K, D]``) and the aggregate
``g`` the server applied. It needs no utility evaluation and no validation data, only one pass
over the updates. Xu, Lyu, Ma, Miao, Foo and Low, "Gradient Driven Rewards to Guarantee Fairness
in Collaborative Machine Learning", NeurIPS 2021, show that this similarity approximates a
participant's Shapley value in a game of gradient alignment (their cosine gradient Shapley value).

It measures agreement with the aggregate, not the aggregate's benefit: a client that copies the
aggregate of an earlier round scores high. A zero update (a free rider that sends nothing) and
every update of a round whose aggregate is zero score 0 by definition.
"""

from __future__ import annotations

import torch

from fedguard.algorithms import finite
from fedguard.algorithms.contribution import utility as contribution_utility

CHUNK = 1 << 16  # columns per float64 block: bounded extra memory for large models


def cosine_to_aggregate(updates: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
    """``cos(u_k, g)`` for every row of ``updates [K, D]`` and ``aggregate [D]``: float64 ``[K]``.

    Dot products and norms are accumulated in float64, block by block over the columns; a zero
    row or a zero aggregate gives 0.
    """
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise contribution_utility.ContributionError(
            f"Updates must be a non-empty [K, D] matrix, got shape {tuple(updates.shape)}."
        )
    if aggregate.shape != updates.shape[1:]:
        raise contribution_utility.ContributionError(
            f"The aggregate has shape {tuple(aggregate.shape)}, the updates "
            f"{tuple(updates.shape)}; expected [D] with D = {updates.shape[1]}."
        )
    if not finite.all_finite(updates) or not finite.all_finite(aggregate):
        raise contribution_utility.ContributionError(
            "The updates or the aggregate contain NaN or infinite values."
        )
    k = updates.shape[0]
    dots = torch.zeros(k, dtype=torch.float64)
    row_sq = torch.zeros(k, dtype=torch.float64)
    agg_sq = torch.zeros((), dtype=torch.float64)
    for start in range(0, updates.shape[1], CHUNK):
        block = updates[:, start : start + CHUNK].to(torch.float64)
        g = aggregate[start : start + CHUNK].to(torch.float64)
        dots += block @ g
        row_sq += (block * block).sum(dim=1)
        agg_sq += g @ g
    norms = row_sq.sqrt() * agg_sq.sqrt()
    cos = torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 0.0)
    return cos.clamp(-1.0, 1.0)  # rounding can carry a parallel pair a hair past 1
