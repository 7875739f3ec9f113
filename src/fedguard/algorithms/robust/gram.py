"""Pairwise geometry of a cohort's updates from one matrix product, accurate and overflow-safe.

Krum, Bulyan, the geometric median and the min-max/min-sum attacks need the distances between all
``K`` updates. Forming ``K^2`` differences of length ``D`` costs ``K^2 D`` element passes; the Gram
identity ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`` needs one ``[K, D] x [D, K]`` product, which
BLAS runs near peak speed. Two things make the identity safe with Byzantine inputs:

* Cancellation. If the rows are far from the origin compared with their mutual distances, the
  three terms nearly cancel. We centre at the row whose norm is the (lower) median: with fewer
  than ``K/2`` attackers its norm is at most the largest honest norm, so honest-to-honest entries
  never involve a huge number, whatever the attackers send.
* Overflow. A row of ``3e38`` squares to infinity in float32. If the plain product overflows, it
  is redone with each centred row scaled to unit length (norms in float64), so the product holds
  cosines in ``[-1, 1]`` and the Gram matrix is ``n_i n_j cos_ij`` in float64.

The product runs in the input dtype (float32 keeps it at BLAS speed; the relative error of an
honest-to-honest distance stays near 1e-6 for D = 1e6), accumulated in float64 block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.algorithms.robust import base as robust_base


@dataclass(frozen=True)
class CenteredGram:
    """``gram[i, j] = (u_i - c) . (u_j - c)`` in float64, with ``c = updates[center]``."""

    center: int
    gram: torch.Tensor  # [K, K] float64


def centered_gram(updates: torch.Tensor) -> CenteredGram:
    """The Gram matrix of the updates centred at their median-norm row (see the module docstring)."""
    k = updates.shape[0]
    row_norms = torch.linalg.vector_norm(updates, dim=1)  # may be inf in float32: only ranked
    center = int(torch.argsort(row_norms, stable=True)[(k - 1) // 2])
    c = updates[center]
    gram = _block_gram(updates, c, scale=None)
    if not bool(torch.isfinite(gram).all()):
        norms = robust_base.row_sq_distances(updates, c).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms)).to(updates.dtype)
        gram = norms[:, None] * norms[None, :] * _block_gram(updates, c, scale=inv)
        gram.diagonal().copy_(norms * norms)
    return CenteredGram(center, gram)


def _block_gram(updates: torch.Tensor, c: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``B B^T`` for ``B = (updates - c)``, rows times ``scale`` if given, summed over column blocks."""
    k = updates.shape[0]
    out = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
    for start in range(0, updates.shape[1], robust_base.CHUNK):
        block = updates[:, start : start + robust_base.CHUNK]
        c_block = c[start : start + robust_base.CHUNK]
        if scale is None:
            centred = block - c_block
        else:  # scale before subtracting, so that no intermediate overflows
            centred = block * scale[:, None] - c_block * scale[:, None]
        out += (centred @ centred.T).to(torch.float64)
    return out


def distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """``||u_i - u_j||^2`` from a Gram matrix: symmetric, clamped at 0, exactly 0 on the diagonal."""
    sym = (gram + gram.T) / 2.0  # BLAS need not return an exactly symmetric product
    sq = sym.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * sym).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """The ``[K, K]`` float64 matrix of squared Euclidean distances between the rows of ``updates``."""
    robust_base.check_updates(updates)
    return distances_from_gram(centered_gram(updates).gram)
