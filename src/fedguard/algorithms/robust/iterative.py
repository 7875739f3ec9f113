"""Robust means that damp rather than discard: geometric median, centered clipping, norm bounding.

* Geometric median (RFA): Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated
  Learning", IEEE TSP 2022, Algorithm 2 (smoothed Weiszfeld). With weights ``alpha_k`` summing to
  one, starting from the weighted mean,

      beta_k = alpha_k / max(nu, ||v - u_k||),    v <- sum_k beta_k u_k / sum_k beta_k,

  until ``v`` moves by at most ``tolerance`` times the median distance ``||v - u_k||``. (The
  paper stops on the relative change of the objective ``sum_k alpha_k ||v - u_k||``; with a few
  huge Byzantine updates that sum is dominated by their nearly constant distances and stalls
  while ``v`` is still far from the honest updates, which a median-scaled step does not.)
  Breakdown point 1/2: tolerates ``f`` Byzantine clients when ``K > 2f``.
  Every iterate is a combination ``v = sum_k c_k u_k``, so ``||v - u_k||^2 = c'Gc - 2(Gc)_k +
  G_kk`` with the Gram matrix ``G`` (``robust_gram``): one matrix product, then each iteration is
  ``O(K^2)`` instead of a pass over the ``[K, D]`` matrix.
* Centered clipping: Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, eq. (CC): from a reference ``v`` (the previous round's aggregate, the
  server momentum), ``L`` times

      v <- v + sum_k alpha_k (u_k - v) min(1, tau / ||u_k - v||).

  Each attacker moves ``v`` by at most ``alpha_k tau`` per iteration. We require ``K > 2f``.
* Norm bounding: Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
  2019, section 3: ``u_k <- u_k / max(1, ||u_k|| / M)``, then the weighted mean. The clip is the
  one of ``dp_fedavg.clip_update`` (the client-side half under secure aggregation); each attacker
  moves the mean by at most ``alpha_k M``. We require ``K > 2f``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import gram as robust_gram


@dataclass(frozen=True)
class GeometricMedianResult:
    aggregate: torch.Tensor  # [D], the dtype of the updates
    iterations: int  # Weiszfeld updates performed
    converged: bool  # the relative improvement fell below the tolerance


def geometric_median(
    updates: torch.Tensor,
    weights: torch.Tensor,
    *,
    f: int,
    nu: float = 1e-6,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
) -> GeometricMedianResult:
    """The weighted geometric median by smoothed Weiszfeld iterations (RFA); needs ``K > 2f``."""
    robust_base.check_updates(updates)
    robust_base.require_honest_majority("The geometric median", updates.shape[0], f)
    alpha = robust_base.normalised_weights(weights, updates.shape[0])
    if not nu > 0:
        raise robust_base.RobustnessError(f"The smoothing nu must be positive, got {nu}.")
    if max_iterations < 1 or not tolerance > 0:
        raise robust_base.RobustnessError(
            f"Need max_iterations >= 1 and tolerance > 0, got {max_iterations} and {tolerance}."
        )
    gram = robust_gram.centered_gram(updates).gram
    coefficients = alpha
    for iteration in range(1, max_iterations + 1):
        beta = alpha / _distances(gram, coefficients).clamp_min(nu)
        step = beta / beta.sum() - coefficients
        coefficients = coefficients + step
        moved = max(float(step @ gram @ step), 0.0) ** 0.5  # step sums to 0: centring cancels
        if moved <= tolerance * float(_distances(gram, coefficients).median()):
            return GeometricMedianResult(
                robust_base.combine(coefficients, updates), iteration, True
            )
    return GeometricMedianResult(robust_base.combine(coefficients, updates), max_iterations, False)


def _distances(gram: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``||sum_j c_j u_j - u_k||`` for every k, from the centred Gram matrix (sum_j c_j = 1)."""
    g_c = gram @ coefficients
    sq = coefficients @ g_c - 2.0 * g_c + gram.diagonal()
    return sq.clamp_min(0.0).sqrt()


def centered_clipping(
    updates: torch.Tensor,
    weights: torch.Tensor,
    *,
    f: int,
    reference: torch.Tensor,
    tau: float = 10.0,
    iterations: int = 1,
) -> torch.Tensor:
    """``iterations`` rounds of clipping around ``reference`` (the last aggregate); ``K > 2f``.

    The defaults ``tau = 10`` and one iteration are those of the paper's experiments with momentum;
    with ``tau`` at least the largest distance to ``reference``, one iteration is the weighted mean.
    """
    robust_base.check_updates(updates)
    robust_base.require_honest_majority("Centered clipping", updates.shape[0], f)
    alpha = robust_base.normalised_weights(weights, updates.shape[0])
    if reference.shape != updates.shape[1:]:
        raise robust_base.RobustnessError(
            f"The reference has shape {tuple(reference.shape)}, the updates {tuple(updates.shape)}."
        )
    if not tau > 0 or iterations < 1:
        raise robust_base.RobustnessError(
            f"Need tau > 0 and iterations >= 1, got tau={tau} and iterations={iterations}."
        )
    v = reference.to(updates.dtype)
    for _ in range(iterations):
        distance = robust_base.row_sq_distances(updates, v).sqrt()
        scale = torch.where(distance > tau, tau / distance, torch.ones_like(distance))
        c = alpha * scale
        v = v * (1.0 - float(c.sum())) + robust_base.combine(c, updates)
    return v


def norm_bounding(
    updates: torch.Tensor, weights: torch.Tensor, *, f: int, bound: float
) -> torch.Tensor:
    """Weighted mean of the updates, each first scaled down to L2 norm at most ``bound``; ``K > 2f``."""
    robust_base.check_updates(updates)
    robust_base.require_honest_majority("Norm bounding", updates.shape[0], f)
    alpha = robust_base.normalised_weights(weights, updates.shape[0])
    if not bound > 0:
        raise robust_base.RobustnessError(f"The norm bound must be positive, got {bound}.")
    norms = robust_base.row_norms(updates)
    scale = torch.where(norms > bound, bound / norms, torch.ones_like(norms))
    return robust_base.combine(alpha * scale, updates)
