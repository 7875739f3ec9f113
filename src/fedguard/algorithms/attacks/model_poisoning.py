"""Model-poisoning attacks: what the malicious clients of a round send instead of their updates.

Each function maps the round's honest updates ``honest [N, D]`` (omniscient attacks read them, as
in their papers; pass the attackers' own honest updates instead to model a weaker attacker) and/or
the malicious clients' own honest updates ``own [M, D]`` to the malicious updates ``[M, D]``.

* Sign flipping: ``-s u`` (the reversed-gradient attack, e.g. Damaskinos et al. 2018).
* Boosting: ``lambda u`` (explicit boosting, Bhagoji et al., "Analyzing Federated Learning
  through an Adversarial Lens", ICML 2019, section 3).
* Gaussian: ``N(0, sigma^2 I)`` vectors (the "Gaussian Byzantine" workers of Blanchard et al. 2017).
* A Little Is Enough: Baruch, Baruch, Goldberg, NeurIPS 2019, Algorithm 3:
  ``s = floor(n / 2 + 1) - m``, ``z = Phi^-1((n - s) / n)``, each coordinate ``mu_j - z sigma_j``.
* Inner-product manipulation: Xie, Koyejo, Gupta, "Fall of Empires", UAI 2019, section 4:
  ``-epsilon * mean(honest)``.
* Min-max / min-sum: Shejwalkar, Houmansadr, "Manipulating the Byzantine", NDSS 2021, eqs. (5)
  and (6): ``mu + gamma p`` with ``p`` the perturbation (``-mu / ||mu||``, ``-sigma`` or
  ``-sign(mu)``) and the largest ``gamma`` such that ``max_i ||m - u_i|| <= max_ij ||u_i - u_j||``
  (min-max) or ``sum_i ||m - u_i||^2 <= max_i sum_j ||u_i - u_j||^2`` (min-sum).

Statistics (``mu``, ``sigma``) are per coordinate over the rows of ``honest``, ``sigma`` with the
``1/N`` normalisation.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Callable

import torch

from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import gram as robust_gram


class Perturbation(enum.StrEnum):
    """The direction ``p`` of the min-max / min-sum attacks (Shejwalkar & Houmansadr, section 4)."""

    UNIT_VECTOR = "unit_vector"  # -mu / ||mu||
    STD = "std"  # -sigma
    SIGN = "sign"  # -sign(mu)


def free_ride(own: torch.Tensor) -> torch.Tensor:
    """A free rider's update: zero, i.e. the global model sent back unchanged (Lin, Du and Liu,
    "Free-riders in Federated Learning: Attacks and Defenses", arXiv 1911.12560, 2019). It
    still claims its real example count, so the weighted mean is pulled towards no change."""
    return torch.zeros_like(own)


def sign_flip(own: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """``-scale * own``."""
    _check_matrix(own, "own")
    return -scale * own


def boost(own: torch.Tensor, *, factor: float) -> torch.Tensor:
    """``factor * own``: the update scaled up to survive averaging with the honest ones."""
    _check_matrix(own, "own")
    return factor * own


def gaussian(own: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    """Random vectors ``N(0, std^2 I)`` of the shape of ``own`` (its values are not used)."""
    _check_matrix(own, "own")
    if not std > 0:
        raise robust_base.RobustnessError(f"The noise std must be positive, got {std}.")
    return std * torch.randn(own.shape, generator=generator, dtype=own.dtype)


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - m``."""
    n, m = num_clients, num_malicious
    if not 0 < m < n:
        raise robust_base.RobustnessError(f"ALIE needs 0 < m < n, got n={n} and m={m}.")
    s = math.floor(n / 2 + 1) - m
    if s <= 0:
        raise robust_base.RobustnessError(
            f"ALIE's z is unbounded with m >= n/2 + 1 malicious clients; got n={n} and m={m}."
        )
    return statistics.NormalDist().inv_cdf((n - s) / n)


def alie(honest: torch.Tensor, *, num_malicious: int, z: float) -> torch.Tensor:
    """``num_malicious`` copies of ``mu - z sigma`` over the honest updates (use ``alie_z``)."""
    _check_matrix(honest, "honest")
    mu, sigma = _mean_std(honest)
    return (mu - z * sigma).to(honest.dtype).expand(num_malicious, -1).clone()


def inner_product_manipulation(
    honest: torch.Tensor, *, num_malicious: int, epsilon: float
) -> torch.Tensor:
    """``num_malicious`` copies of ``-epsilon * mean(honest)``."""
    _check_matrix(honest, "honest")
    if not epsilon > 0:
        raise robust_base.RobustnessError(f"IPM's epsilon must be positive, got {epsilon}.")
    return (-epsilon * honest.mean(dim=0)).expand(num_malicious, -1).clone()


def perturbation(honest: torch.Tensor, kind: Perturbation) -> torch.Tensor:
    """The direction ``p`` (float64 ``[D]``) computed from the honest updates."""
    mu, sigma = _mean_std(honest)
    if kind is Perturbation.UNIT_VECTOR:
        norm = float(torch.linalg.vector_norm(mu))
        if norm == 0.0:
            raise robust_base.RobustnessError("The honest mean is zero: it has no unit vector.")
        return -mu / norm
    if kind is Perturbation.STD:
        return -sigma
    return -torch.sign(mu)


def min_max_gamma(honest: torch.Tensor, direction: torch.Tensor, *, tolerance: float) -> float:
    """Largest ``gamma`` (within ``tolerance``) with ``max_i ||mu + gamma p - u_i||`` in bounds."""
    threshold = float(robust_gram.pairwise_sq_distances(honest).max())
    return _largest_gamma(honest, direction, lambda sq: float(sq.max()), threshold, tolerance)


def min_sum_gamma(honest: torch.Tensor, direction: torch.Tensor, *, tolerance: float) -> float:
    """Largest ``gamma`` (within ``tolerance``) with ``sum_i ||mu + gamma p - u_i||^2`` in bounds."""
    threshold = float(robust_gram.pairwise_sq_distances(honest).sum(dim=1).max())
    return _largest_gamma(honest, direction, lambda sq: float(sq.sum()), threshold, tolerance)


def min_max(
    honest: torch.Tensor, *, num_malicious: int, kind: Perturbation, tolerance: float = 1e-5
) -> torch.Tensor:
    """``num_malicious`` copies of ``mu + gamma p``, gamma from ``min_max_gamma``."""
    return _agr_agnostic(honest, num_malicious, kind, tolerance, min_max_gamma)


def min_sum(
    honest: torch.Tensor, *, num_malicious: int, kind: Perturbation, tolerance: float = 1e-5
) -> torch.Tensor:
    """``num_malicious`` copies of ``mu + gamma p``, gamma from ``min_sum_gamma``."""
    return _agr_agnostic(honest, num_malicious, kind, tolerance, min_sum_gamma)


def _agr_agnostic(
    honest: torch.Tensor,
    num_malicious: int,
    kind: Perturbation,
    tolerance: float,
    find_gamma: Callable[..., float],
) -> torch.Tensor:
    _check_matrix(honest, "honest")
    direction = perturbation(honest, kind)
    gamma = find_gamma(honest, direction, tolerance=tolerance)
    mu, _ = _mean_std(honest)
    return (mu + gamma * direction).to(honest.dtype).expand(num_malicious, -1).clone()


def _largest_gamma(
    honest: torch.Tensor,
    direction: torch.Tensor,
    objective: Callable[[torch.Tensor], float],
    threshold: float,
    tolerance: float,
) -> float:
    """Bisection for the largest feasible ``gamma >= 0``.

    ``||mu + gamma p - u_i||^2 = a_i + 2 gamma b_i + gamma^2 c`` with ``a_i = ||mu - u_i||^2``,
    ``b_i = p . (mu - u_i)``, ``c = ||p||^2``: convex in gamma, so the feasible gammas form an
    interval from 0 (the mean is feasible for both objectives). We double an upper bracket from 1
    until it is infeasible, then halve ``[lo, hi]`` until ``hi - lo <= tolerance`` and return
    ``lo``: feasible, with ``lo + tolerance`` infeasible. (The paper's Algorithm 1 searches the
    same quantity from ``gamma_init = 10`` with halving steps.)
    """
    if not tolerance > 0:
        raise robust_base.RobustnessError(
            f"The bisection tolerance must be positive, got {tolerance}."
        )
    mu, _ = _mean_std(honest)
    p = direction.to(torch.float64)
    c = float(p @ p)
    if c == 0.0:
        raise robust_base.RobustnessError("The perturbation direction is zero: every gamma fits.")
    diff = mu - honest.to(torch.float64)
    a, b = (diff * diff).sum(dim=1), diff @ p

    def feasible(gamma: float) -> bool:
        return objective(a + 2.0 * gamma * b + gamma * gamma * c) <= threshold

    lo, hi = 0.0, 1.0
    while feasible(hi):
        lo, hi = hi, 2.0 * hi
    while hi - lo > tolerance:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _mean_std(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = honest.to(torch.float64)
    return x.mean(dim=0), x.std(dim=0, correction=0)


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise robust_base.RobustnessError(
            f"{name} must be a non-empty [rows, D] matrix, got shape {tuple(x.shape)}."
        )
