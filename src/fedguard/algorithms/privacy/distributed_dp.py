"""Distributed DP with the Skellam mechanism: every client noises its own quantised update.

Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated Learning"
(NeurIPS 2021). Under secure aggregation the server sees only the sum, so each client adds its
share of integer noise before masking; the shares add up to the mechanism's noise and, being
integers, survive the modular arithmetic of the masks exactly. Client ``u``

1. clips its update to L2 norm ``C`` and scales it by ``s`` (so ``||s x_u||_2 <= c = s C``);
2. rounds ``s x_u`` to integers with the *conditional randomized rounding* of Kairouz, Liu and
   Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning" (ICML 2021),
   section 4.1: unbiased stochastic rounding, repeated until the rounded vector has norm at most

       ``Delta_2 = sqrt(min(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2), (c + sqrt(d))^2))``

   (their bound on the norm after randomized rounding: one try fails with probability at most
   ``beta``), so ``Delta_2`` is a hard L2 bound on one client's integer contribution; for an
   integer vector the L1 norm is at most ``Delta_1 = min(Delta_2^2, sqrt(d) Delta_2)``
   (Agarwal et al., section 3);
3. adds ``Poisson(lam) - Poisson(lam)`` per coordinate (Skellam ``Sk(lam, lam)``, variance
   ``2 lam``, sampled exactly with numpy's ``Generator.poisson``), with
   ``2 lam = (z s C)^2 / m`` for noise multiplier ``z`` and ``m`` noise shares, so that the sum
   over ``m`` clients is ``Sk(m lam, m lam)`` with standard deviation ``z s C`` (a sum of
   independent Skellam variables is Skellam);
4. appends the weight 1 and masks.

The server aborts a round with fewer than ``m`` masked inputs, so a released sum always carries at
least the accounted noise (see :func:`fedguard.algorithms.privacy.accounting.skellam_epsilon`).

**Ring headroom.** With ``n`` clients and at most ``n`` noise shares, a coordinate of the sum is
at most ``n (s C + 1)`` in magnitude plus noise of standard deviation ``z s C sqrt(n / m)``; the
scale ``s = (2^(b-1) - 1 - n) / (C (n + K z sqrt(n / m)))`` with ``K = 8`` keeps it inside the
signed ``b``-bit range except with negligible probability (a wrap harms accuracy, not privacy).
``s C`` is capped at ``2^20``: the rounding then adds at most ``sqrt(d) / 2`` to a norm of a
million levels, and the Poisson rates stay far inside the range where numpy samples exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedguard.algorithms.secagg import quantize as secagg_quantize

HEADROOM_SIGMAS = 8.0
MAX_LEVELS = float(2**20)
DEFAULT_BETA = math.exp(-0.5)  # Kairouz et al.'s choice: at most ~2.5 rounding tries expected
MAX_ROUNDING_TRIES = 1000


@dataclass(frozen=True)
class Skellam:
    """The distributed Skellam mechanism of a run: noise multiplier ``z``, ``m`` noise shares."""

    noise_multiplier: float
    noise_clients: int
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"The noise multiplier must be positive, got {self.noise_multiplier}.")
        if self.noise_clients < 1:
            raise ValueError(
                f"The noise must be shared by at least 1 client, got {self.noise_clients}."
            )
        if not 0 < self.beta < 1:
            raise ValueError(
                f"The rounding failure probability must be in (0, 1), got {self.beta}."
            )


def fixed_point(
    *, bits: int, clip_norm: float, num_clients: int, mechanism: Skellam
) -> secagg_quantize.FixedPoint:
    """The encoding whose ring holds ``num_clients`` rounded updates plus their noise."""
    if not clip_norm > 0:
        raise ValueError(f"The clip norm must be positive, got {clip_norm}.")
    if num_clients < 1:
        raise ValueError(f"The number of clients must be positive, got {num_clients}.")
    secagg_quantize.fixed_point(
        bits=bits, clip_norm=clip_norm, num_clients=num_clients, max_weight=1
    )
    spread = HEADROOM_SIGMAS * mechanism.noise_multiplier
    spread *= math.sqrt(max(num_clients, mechanism.noise_clients) / mechanism.noise_clients)
    levels = ((1 << (bits - 1)) - 1 - num_clients) / (num_clients + spread)
    if levels < 1:
        raise ValueError(
            f"{bits} bits cannot hold the noised sum of {num_clients} updates at noise "
            f"multiplier {mechanism.noise_multiplier}; raise secure_aggregation.bits."
        )
    return secagg_quantize.FixedPoint(bits, clip_norm, min(levels, MAX_LEVELS) / clip_norm, 1)


def l2_sensitivity(levels: float, dim: int, beta: float) -> float:
    """``Delta_2``: the norm bound that conditional rounding enforces on ``c = levels``."""
    root_d = math.sqrt(dim)
    tight = levels**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (levels + root_d / 2)
    return math.sqrt(min(tight, (levels + root_d) ** 2))


def l1_sensitivity(l2: float, dim: int) -> float:
    """``Delta_1 <= min(Delta_2^2, sqrt(d) Delta_2)`` for an integer vector of norm ``Delta_2``."""
    return min(l2 * l2, math.sqrt(dim) * l2)


def conditional_round(
    values: np.ndarray, bound: float, generator: np.random.Generator
) -> np.ndarray:
    """Unbiased stochastic rounding of ``values`` (float64), redrawn until the L2 norm is at most
    ``bound`` (Kairouz et al. 2021, section 4.1); int64."""
    low = np.floor(values)
    frac = values - low
    base = low.astype(np.int64)
    for _ in range(MAX_ROUNDING_TRIES):
        q = base + (generator.random(values.shape) < frac)
        if float(np.einsum("i,i->", q, q, dtype=np.float64)) <= bound * bound:
            return q
    raise RuntimeError(
        f"Conditional rounding found no rounding within norm {bound:.6g} in "
        f"{MAX_ROUNDING_TRIES} tries; the input exceeds the clip it was scaled for."
    )


def client_rate(mechanism: Skellam, levels: float) -> float:
    """One client's Poisson rate ``lam = (z c)^2 / (2 m)`` (its noise has variance ``2 lam``)."""
    return (mechanism.noise_multiplier * levels) ** 2 / (2 * mechanism.noise_clients)


def skellam_noise(dim: int, rate: float, generator: np.random.Generator) -> np.ndarray:
    """``dim`` independent ``Poisson(rate) - Poisson(rate)`` integers (int64), exact."""
    return generator.poisson(rate, dim) - generator.poisson(rate, dim)


def encode(
    update: np.ndarray,
    fp: secagg_quantize.FixedPoint,
    mechanism: Skellam,
    generator: np.random.Generator,
) -> np.ndarray:
    """``[q + noise, 1]`` in the ring: clipped, scaled, conditionally rounded, Skellam-noised.

    ``generator`` must be secret to the client (seeded from its own entropy): whoever can replay
    it can subtract the noise.
    """
    levels = fp.scale * fp.clip_norm
    x = secagg_quantize.clip(update, fp.clip_norm) * fp.scale
    q = conditional_round(x, l2_sensitivity(levels, x.shape[0], mechanism.beta), generator)
    q += skellam_noise(q.shape[0], client_rate(mechanism, levels), generator)
    return secagg_quantize.to_ring(np.append(q, 1), fp.bits)
