"""Plain aggregation of client updates: the example-weighted mean of FedAvg (McMahan et al. 2017)."""

from __future__ import annotations

import torch


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return ``sum_k w_k u_k / sum_k w_k`` for updates ``[K, D]`` and non-negative weights ``[K]``.

    Computed in float64 and returned as float32, so that the mean of many clients does not drift
    with the order of summation beyond float32 rounding.
    """
    if updates.ndim != 2:
        raise ValueError(f"Updates must be a [K, D] matrix, got shape {tuple(updates.shape)}.")
    if weights.shape != (updates.shape[0],):
        raise ValueError(
            f"Expected {updates.shape[0]} weights, one per update, got shape {tuple(weights.shape)}."
        )
    if updates.shape[0] == 0:
        raise ValueError("Cannot aggregate an empty cohort: no client update arrived.")
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0.0:
        raise ValueError("Aggregation weights must be finite, non-negative, with a positive sum.")
    return ((w / w.sum()) @ updates.to(torch.float64)).to(torch.float32)
