"""User-level DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

Both halves live here. The client clips its update to L2 norm ``C`` and reports one bit, whether
the unclipped norm was at most ``C``; that is all it does, so the clipped updates can be summed
under secure aggregation. The server adds Gaussian noise of std ``z * C`` to the sum and divides
by the expected number of clients (a fixed denominator: the average's sensitivity stays ``C``
over that number, whatever the realised sample). With adaptive clipping the server also
privatises the count of "unclipped" bits and moves ``C`` geometrically towards the
``target_quantile`` of update norms; the noise on the updates is raised so that the pair of
Gaussian mechanisms together spends exactly the budget of one with multiplier ``z``.

``z`` is relative to the clip (the noise std is ``z C``); the multiplier the accountant composes
is ``z C`` over the sum's L2 sensitivity, which depends on the neighbouring relation (``C`` under
add-or-remove-one, ``2C`` under replace-one; see :mod:`fedguard.algorithms.privacy.accounting`). The bits
are centred at ``+-1/2`` before they are summed, so the count's sensitivity is ``1/2`` under
add-or-remove-one and ``1`` under replace-one: in both relations it is the sum's sensitivity
times ``1 / (2C)``, and the split of the budget below holds in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipResult:
    update: torch.Tensor
    norm: float
    unclipped: bool  # the norm was at most the bound (the adaptive-clipping bit)


def clip_update(update: torch.Tensor, clip_norm: float) -> ClipResult:
    """``update`` scaled down to L2 norm ``clip_norm`` if it is longer."""
    if clip_norm <= 0.0:
        raise ValueError(f"The clip norm must be positive, got {clip_norm}.")
    norm = float(torch.linalg.vector_norm(update.double()))
    if norm <= clip_norm:
        return ClipResult(update, norm, True)
    return ClipResult(update * (clip_norm / norm), norm, False)


def update_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """Noise multiplier left for the updates when the clip count also spends budget.

    Andrew et al. (2021), section 3: a Gaussian sum query with multiplier ``z_delta`` and the
    count query with std ``sigma_b`` (sensitivity 1/2 after centring the bits) compose to one
    Gaussian mechanism with ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2``. Under replace-one both
    sensitivities double (``2C`` and 1), so the pair composes to one Gaussian with ``z / 2`` per
    unit of sensitivity, exactly as the sum alone with ``z`` would: the same split holds.
    """
    if count_noise_multiplier <= 0.0:
        return noise_multiplier
    remaining = noise_multiplier**-2 - (2.0 * count_noise_multiplier) ** -2
    if remaining <= 0.0:
        raise ValueError(
            f"privacy.clip_count_stddev={count_noise_multiplier} is too small for "
            f"noise_multiplier={noise_multiplier}: it must exceed {0.5 * noise_multiplier:.4g} "
            "(z / 2); the paper suggests the expected number of clients per round / 20"
        )
    return remaining**-0.5


def noisy_sum(
    clipped_sum: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``sum + N(0, (z C)^2 I)`` in float64 (a strategy's sum path divides it)."""
    noise = torch.randn(clipped_sum.shape, generator=generator, dtype=torch.float64)
    return clipped_sum.double() + noise * (noise_multiplier * clip_norm)


def noisy_mean(
    clipped_sum: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(sum + N(0, (z C)^2 I)) / denominator``, in float64 for the sum then back to float32."""
    total = noisy_sum(
        clipped_sum, clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=generator
    )
    return (total / denominator).to(torch.float32)


def next_clip_norm(
    clip_norm: float,
    unclipped_count: float,
    num_updates: int,
    *,
    target_quantile: float,
    denominator: float,
    learning_rate: float,
    count_stddev: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """The next round's clip norm and the privatised fraction of unclipped updates.

    Geometric update ``C <- C exp(-eta (b - gamma))`` with ``gamma`` the target quantile and
    ``b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2`` the noisy fraction of the
    ``num_updates`` clients whose update norm was at most ``C`` (``b_i = 1``), centred as in
    Andrew et al. (2021), algorithm 1: one client added or removed moves the centred sum by
    ``1/2``, which is the sensitivity the budget split of :func:`update_noise_multiplier` assumes.
    ``m`` is the fixed ``denominator`` (the expected number of clients).
    """
    if not 0 <= unclipped_count <= num_updates:
        raise ValueError(
            f"unclipped_count={unclipped_count} must lie in 0..num_updates={num_updates}"
        )
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_stddev
    centred = unclipped_count - 0.5 * num_updates
    fraction = (centred + noise) / denominator + 0.5
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile)), fraction
