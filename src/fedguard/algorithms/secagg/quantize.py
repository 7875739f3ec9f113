"""Fixed-point encoding of clipped updates in the ring ``Z_{2^b}`` and back, for secure aggregation.

Masks only cancel in modular arithmetic, so each client maps its update to integers before
masking (Bonawitz et al., CCS 2017, section 2; Kairouz et al., "The Distributed Discrete Gaussian
Mechanism", ICML 2021, section 4 for the stochastic rounding). The client

1. clips its update ``x`` to L2 norm ``C`` (so every coordinate satisfies ``|x_j| <= C``);
2. scales by ``s`` and rounds stochastically: ``q = floor(s x) + Bernoulli(frac(s x))``, an
   unbiased integer (``E[q] = s x``) with ``|q_j| <= s C + 1``;
3. multiplies by its integer weight ``w`` (its example count capped at ``W``, or 1 for an
   unweighted sum) and appends ``w`` as one extra coordinate: ``[w q, w]``.

**Overflow bound.** With ``n`` clients, ``|sum_u w_u q_u| <= n W (s C + 1)``; the scale

    ``s = (floor((2^(b-1) - 1) / (n W)) - 1) / C``

makes this at most ``2^(b-1) - 1``, so the sum, read as a signed ``b``-bit integer, is exact.
``s C`` is also capped at ``2^52`` so that ``s x`` is exact in float64 for ``b`` up to 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedguard.algorithms.secagg import crypto as secagg_crypto

_FLOAT_EXACT = float(2**52)


@dataclass(frozen=True)
class FixedPoint:
    """The encoding of one round: ring bits, clip, scale and the weight cap."""

    bits: int
    clip_norm: float
    scale: float
    max_weight: int

    @property
    def dtype(self) -> np.dtype:
        return secagg_crypto.ring_dtype(self.bits)


def fixed_point(*, bits: int, clip_norm: float, num_clients: int, max_weight: int) -> FixedPoint:
    """The largest scale at which the sum of ``num_clients`` encoded updates cannot overflow."""
    secagg_crypto.ring_dtype(bits)  # validates bits
    if not clip_norm > 0:
        raise ValueError(f"The clip norm must be positive, got {clip_norm}.")
    if num_clients < 1 or max_weight < 1:
        raise ValueError(
            f"The number of clients and the weight cap must be positive, got {num_clients} and {max_weight}."
        )
    levels = ((1 << (bits - 1)) - 1) // (num_clients * max_weight) - 1
    if levels < 1:
        raise ValueError(
            f"{bits} bits cannot hold the sum of {num_clients} updates of weight up to {max_weight}; "
            "raise the bits or lower the weight cap."
        )
    return FixedPoint(bits, clip_norm, min(float(levels), _FLOAT_EXACT) / clip_norm, max_weight)


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``clip_norm`` if longer (float64)."""
    x = np.asarray(update, dtype=np.float64)
    norm = float(np.sqrt(np.einsum("i,i->", x, x)))  # not BLAS: its threads cost ms per call
    return x if norm <= clip_norm else x * (clip_norm / norm)


def stochastic_round(values: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Unbiased integer rounding: ``floor(v + u)`` for ``u`` uniform on ``[0, 1)``, which is
    ``floor(v) + 1`` exactly when ``u >= 1 - frac(v)``, with probability ``frac(v)``.

    One addition and one floor in place (float64), not the five passes of comparing ``u`` with
    the fractional part. The uniforms are float32 (twice as fast to draw): the probability is
    then exact to ``2^-24``, a bias far below the quantisation step it decides.
    """
    v = np.array(values, dtype=np.float64)  # a copy: the caller's array is not modified
    return _round_in_place(v, generator)


def _round_in_place(v: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    v += generator.random(v.shape, dtype=np.float32)
    np.floor(v, out=v)
    return v.astype(np.int64)


def encode(
    update: np.ndarray, weight: int, fp: FixedPoint, generator: np.random.Generator
) -> np.ndarray:
    """``[w q, w]`` in the ring for a client update (clipped here) and its weight ``w``.

    The clip and the scale are one multiplication, the rounding and the weighting are in place
    (``w q`` is an integer below ``2^(b-1)`` by the overflow bound, exact in float64) and the
    result is cast once into the ring's words read as signed integers (two's complement is the
    residue modulo ``2^32`` or ``2^64``), so the update is read a handful of times, not a dozen.
    """
    w = min(int(weight), fp.max_weight)
    if w < 1:
        raise ValueError(f"A client's weight must be positive, got {weight}.")
    x = np.asarray(update)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    norm = float(np.sqrt(np.einsum("i,i->", x, x, dtype=np.float64)))
    factor = fp.scale * (1.0 if norm <= fp.clip_norm else fp.clip_norm / norm)
    v = np.multiply(x, factor, dtype=np.float64)
    v += generator.random(v.shape, dtype=np.float32)
    np.floor(v, out=v)
    if w != 1:
        v *= w
    out = np.empty(v.shape[0] + 1, dtype=fp.dtype)
    signed = out.view(np.int32 if fp.dtype.itemsize == 4 else np.int64)
    np.copyto(signed[:-1], v, casting="unsafe")
    out[-1] = w
    if fp.bits not in (32, 64):
        out &= secagg_crypto.ring_mask(fp.bits)
    return out


def to_ring(signed: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers to their residues in ``Z_{2^bits}`` (two's complement, masked)."""
    dtype = secagg_crypto.ring_dtype(bits)
    return signed.astype(np.int64).view(np.uint64).astype(dtype) & secagg_crypto.ring_mask(bits)


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues in ``Z_{2^bits}`` to signed integers in ``[-2^(b-1), 2^(b-1))`` (int64)."""
    v = (values & secagg_crypto.ring_mask(bits)).astype(np.uint64)
    if bits == 64:
        return v.view(np.int64)
    signed = v.astype(np.int64)
    return np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)


@dataclass(frozen=True)
class DecodedSum:
    """The dequantised sum: ``total = sum_u w_u x_u`` (float64) and ``weight = sum_u w_u``."""

    total: np.ndarray
    weight: int


def decode_sum(ring_sum: np.ndarray, fp: FixedPoint) -> DecodedSum:
    """The inverse of :func:`encode` for a sum of encodings (exact up to the rounding noise)."""
    signed = from_ring(ring_sum, fp.bits)
    return DecodedSum(signed[:-1].astype(np.float64) / fp.scale, int(signed[-1]))
