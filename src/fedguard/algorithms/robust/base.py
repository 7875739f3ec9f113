"""What every Byzantine-robust aggregator shares: its error type, input checks and weighted sums.

The aggregators in ``robust_coordinate``, ``robust_distance`` and ``robust_iterative`` take the
cohort's updates as a ``[K, D]`` float tensor and return one ``[D]`` vector of the same dtype.
They refuse, with one sentence, a number ``f`` of Byzantine clients beyond what they tolerate.
"""

from __future__ import annotations

import torch

from fedguard.algorithms import finite

# Columns per block when a [K, D] pass needs a float64 or a centred copy: bounded extra memory.
CHUNK = 1 << 16


class RobustnessError(ValueError):
    """A robust aggregator or an attack was asked for something it cannot do as configured."""


def check_updates(updates: torch.Tensor) -> None:
    """Refuse anything but a non-empty, finite ``[K, D]`` float32/float64 matrix."""
    if updates.ndim != 2:
        raise RobustnessError(f"Updates must be a [K, D] matrix, got shape {tuple(updates.shape)}.")
    if updates.dtype not in (torch.float32, torch.float64):
        raise RobustnessError(f"Updates must be float32 or float64, got {updates.dtype}.")
    if updates.shape[0] == 0 or updates.shape[1] == 0:
        raise RobustnessError(f"Cannot aggregate an empty matrix of shape {tuple(updates.shape)}.")
    if not finite.all_finite(updates):
        bad = (~torch.isfinite(updates)).any(dim=1).nonzero().flatten().tolist()
        raise RobustnessError(
            f"Update rows {bad} contain NaN or infinite values; reject them before aggregation."
        )


def check_f(f: int) -> None:
    """The number of Byzantine clients is a non-negative integer."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise RobustnessError(
            f"The number of Byzantine clients f must be an integer >= 0, got {f!r}."
        )


def require_honest_majority(name: str, k: int, f: int) -> None:
    """Refuse ``f`` Byzantine clients unless ``K > 2f`` (an honest majority)."""
    check_f(f)
    if not k > 2 * f:
        raise RobustnessError(f"{name} needs K > 2f updates; got K={k} with f={f}.")


def normalised_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """``w / sum(w)`` in float64, after checking there is one finite non-negative weight per update."""
    if weights.shape != (k,):
        raise RobustnessError(
            f"Expected {k} weights, one per update, got shape {tuple(weights.shape)}."
        )
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0.0:
        raise RobustnessError(
            "Aggregation weights must be finite, non-negative, with a positive sum."
        )
    return w / w.sum()


def combine(coefficients: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """``sum_k c_k u_k`` for coefficients ``[K]``, as one matrix-vector product in the updates' dtype.

    Callers pass coefficients computed in float64; a float32 product keeps the cost at one pass
    over the matrix (a float64 copy of a [100, 1e6] matrix costs more than the aggregation itself).
    """
    return coefficients.to(updates.dtype) @ updates


def row_norms(updates: torch.Tensor) -> torch.Tensor:
    """``||u_k||`` for every row, float64 ``[K]`` (float64 again for rows that overflow float32)."""
    return row_sq_distances(updates, torch.zeros_like(updates[0])).sqrt()


def row_sq_distances(updates: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``||u_k - point||^2`` for every row, float64 ``[K]``, from the differences (no cancellation).

    Summed in the input dtype block by block and accumulated in float64; rows whose float32 sum
    overflows (entries near 1e38 that a Byzantine client may send) are summed again in float64.
    """
    out = torch.zeros(updates.shape[0], dtype=torch.float64, device=updates.device)
    for start in range(0, updates.shape[1], CHUNK):
        diff = updates[:, start : start + CHUNK] - point[start : start + CHUNK]
        out += torch.linalg.vector_norm(diff, dim=1).to(torch.float64) ** 2  # cascade sum
    overflow = ~torch.isfinite(out)
    if bool(overflow.any()):
        rows = updates[overflow].to(torch.float64) - point.to(torch.float64)
        out[overflow] = (rows * rows).sum(dim=1)
    return out
