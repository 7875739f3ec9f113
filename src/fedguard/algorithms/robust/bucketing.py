"""Bucketing: robust rules on means of small random groups of updates (Karimireddy et al. 2022).

"Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing" (ICLR 2022): on non-IID data
the honest updates differ so much that Krum, the median and their kin mistake honest clients for
outliers, and fall far below the plain mean even with no attacker. Averaging the updates in random
buckets of ``s`` before the robust rule shrinks the honest spread by about ``sqrt(s)``, while each
Byzantine client still spoils at most one bucket: a rule that tolerates ``f`` bad inputs among
``ceil(K / s)`` bucket means tolerates ``f`` Byzantine clients among the ``K`` updates.

The grouping is a fresh random permutation every round (from a seeded generator, so a resumed run
groups as an uninterrupted one), so an attacker cannot plan which honest clients share its bucket.
"""

from __future__ import annotations

import math

import torch

from fedguard.algorithms.robust import base as robust_base


def check_size(size: int) -> None:
    """The bucket size is an integer >= 1 (1: no bucketing)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise robust_base.RobustnessError(f"The bucket size must be an integer >= 1, got {size!r}.")


def bucket_count(k: int, size: int) -> int:
    """How many bucket means ``K`` updates make in buckets of ``size`` (the last may be smaller)."""
    return math.ceil(k / size)


def bucket_means(
    updates: torch.Tensor, weights: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean ``[B, D]`` of every bucket and each bucket's total weight ``[B]``.

    ``updates [K, D]`` are shuffled with ``generator`` and cut into ``B = ceil(K / size)`` buckets of
    ``size`` consecutive rows. Within a bucket the rows are weighted by ``weights`` (example
    counts); a bucket whose weights are all zero takes the plain mean of its rows.
    """
    check_size(size)
    k = updates.shape[0]
    robust_base.normalised_weights(weights, k)  # one finite, non-negative weight per update
    w = weights.to(torch.float64)
    order = torch.randperm(k, generator=generator)
    buckets = bucket_count(k, size)
    # One [B, K] matrix of in-bucket coefficients: a single product forms every bucket mean.
    member = torch.zeros(buckets, k, dtype=torch.float64)
    member[torch.arange(k) // size, order] = 1.0
    mass = member @ w
    coefficients = torch.where(
        (mass > 0).unsqueeze(1),
        member * w / mass.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1),
        member / member.sum(dim=1, keepdim=True),
    )
    return coefficients.to(updates.dtype) @ updates, mass


def bucket_members(k: int, size: int, generator: torch.Generator) -> list[list[int]]:
    """The rows of each bucket that :func:`bucket_means` forms from a generator in the same
    state: the same permutation, cut the same way (bucket ``b`` holds positions ``b * size`` to
    ``(b + 1) * size - 1`` of it). What a rule does to a bucket mean it does to these rows."""
    check_size(size)
    order = torch.randperm(k, generator=generator).tolist()
    return [order[start : start + size] for start in range(0, k, size)]
