"""Privacy accounting through Google's dp-accounting: events, epsilon, noise calibration.

fedguard never computes epsilon itself. It describes what happened as a dp-accounting event
(a sampled Gaussian mechanism, composed over steps or rounds) and asks dp-accounting's RDP or
PLD accountant for epsilon at the configured delta. Anyone can re-check a run's epsilon from the
parameters that ``summary.json`` lists, with the same events.

Two mechanisms occur:

* DP-SGD inside a client (record level): each step Poisson-samples the client's records with
  rate ``q`` and adds Gaussian noise with multiplier ``z``; composed over every step the client
  took in every round it joined.
* DP-FedAvg at the server (user level): each round samples clients, either Poisson with rate
  ``q`` (add-or-remove-one neighbours) or a fixed number ``m`` of ``N`` without replacement
  (replace-one neighbours, RDP only), and adds Gaussian noise to the sum of clipped updates.

dp-accounting's Gaussian multiplier is the noise std over the L2 sensitivity of the noised
function *under the accountant's neighbouring relation* (its RDP for the Gaussian is
``alpha / (2 sigma^2)``, the bound for sensitivity 1; ``SampledWithoutReplacementDpEvent`` under
``REPLACE_ONE`` applies Wang, Balle and Kasiviswanathan 2019, theorem 27, to that base RDP for
replace-one neighbours). A sum of updates clipped to ``C`` moves by at most ``C`` when one client
is added or removed, but by up to ``2C`` when one client's update is replaced by another's, so the
multiplier handed to dp-accounting is ``std / (C * SENSITIVITY_FACTOR[relation])``
(:func:`accounted_multiplier`).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

MAX_NOISE_MULTIPLIER = 100.0
PLD_DISCRETIZATION = 1e-4
SKELLAM_ORDERS = tuple(range(2, 257))  # integer orders, as the Skellam RDP bound requires


# The L2 sensitivity of a sum of vectors clipped to norm C, in units of C, per neighbouring relation.
SENSITIVITY_FACTOR = {
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE: 1.0,
    dp_accounting.NeighboringRelation.REPLACE_ONE: 2.0,
}


def relation(fixed_size: bool) -> dp_accounting.NeighboringRelation:
    """The neighbouring relation accounted for a sampling scheme: fixed-size sampling without
    replacement is analysed under replace-one, Poisson sampling under add-or-remove-one."""
    if fixed_size:
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def accounted_multiplier(noise_stddev: float, l2_sensitivity: float) -> float:
    """The Gaussian multiplier dp-accounting composes: noise std over L2 sensitivity."""
    if l2_sensitivity <= 0.0:
        raise PrivacyError(f"The L2 sensitivity must be positive, got {l2_sensitivity}.")
    return noise_stddev / l2_sensitivity


class Accountant(enum.StrEnum):
    RDP = "rdp"
    PLD = "pld"


class PrivacyError(ValueError):
    """A privacy setting that cannot be honoured (reported before any round runs)."""


@dataclass(frozen=True)
class SampledGaussian:
    """``count`` compositions of a Gaussian mechanism (multiplier ``noise_multiplier``) on a sample.

    ``population``/``sample_size`` set means fixed-size sampling without replacement;
    otherwise Poisson sampling with ``sampling_rate`` (1.0: everyone, every time).
    """

    noise_multiplier: float
    count: int
    sampling_rate: float = 1.0
    population: int | None = None
    sample_size: int | None = None

    @property
    def fixed_size(self) -> bool:
        return self.population is not None

    def event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event for these parameters."""
        if self.count == 0:
            return dp_accounting.NoOpDpEvent()
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.population is not None:  # fixed-size sampling
            if self.sample_size is None:
                raise PrivacyError(
                    "Fixed-size sampling needs the sample size as well as the population."
                )
            one: dp_accounting.DpEvent = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, gaussian
            )
        elif self.sampling_rate >= 1.0:
            one = gaussian
        else:
            one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)
        return dp_accounting.SelfComposedDpEvent(one, self.count)

    def with_noise(self, noise_multiplier: float) -> SampledGaussian:
        return SampledGaussian(
            noise_multiplier, self.count, self.sampling_rate, self.population, self.sample_size
        )

    def with_count(self, count: int) -> SampledGaussian:
        return SampledGaussian(
            self.noise_multiplier, count, self.sampling_rate, self.population, self.sample_size
        )


# One mechanism, or several composed (rounds that ran at different noise multipliers).
Mechanism = SampledGaussian | tuple[SampledGaussian, ...]


def _parts(mechanism: Mechanism) -> tuple[SampledGaussian, ...]:
    parts = mechanism if isinstance(mechanism, tuple) else (mechanism,)
    return tuple(p for p in parts if p.count > 0)


def _accountant(kind: Accountant, fixed_size: bool) -> dp_accounting.PrivacyAccountant:
    if fixed_size:
        if kind is Accountant.PLD:
            raise PrivacyError(
                "privacy.accountant: the PLD accountant does not support fixed-size client "
                'sampling; use privacy.accountant = "rdp" or server.sampling = "poisson"'
            )
        return rdp.RdpAccountant(neighboring_relation=relation(fixed_size))
    if kind is Accountant.PLD:
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return rdp.RdpAccountant()


def epsilon(mechanism: Mechanism, delta: float, kind: Accountant = Accountant.RDP) -> float:
    """Epsilon at ``delta`` after ``mechanism`` (a tuple: its parts composed, as
    ``ComposedDpEvent``); 0 before any step, inf if a part that ran had no noise."""
    parts = _parts(mechanism)
    if not parts:
        return 0.0
    if any(p.noise_multiplier <= 0.0 for p in parts):
        return math.inf
    fixed = {p.fixed_size for p in parts}
    if len(fixed) != 1:
        raise PrivacyError("Cannot compose fixed-size and Poisson sampling in one account.")
    fixed_size = fixed.pop()
    if kind is Accountant.RDP:
        # RDP composes by adding: the composition's curve is each part's one-step curve times its
        # count, as dp-accounting's own ``SelfComposedDpEvent`` computes it, summed in order.
        orders, total = _unit_rdp(parts[0].with_count(1), fixed_size)
        total = parts[0].count * total
        for p in parts[1:]:
            total = total + p.count * _unit_rdp(p.with_count(1), fixed_size)[1]
        return float(rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
    acc = _accountant(kind, fixed_size)
    acc.compose(dp_accounting.ComposedDpEvent([p.event() for p in parts]))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _unit_rdp(one_step: SampledGaussian, fixed_size: bool) -> tuple[np.ndarray, np.ndarray]:
    """dp-accounting's RDP orders and curve of one step of ``one_step`` (its count is 1).

    Cached: a run asks for epsilon after every round and the calibration asks again for every
    candidate multiplier, and the RDP of sampling without replacement (Wang, Balle and
    Kasiviswanathan) takes about a second per multiplier, while the curve of ``k`` steps is just
    ``k`` times that of one. The arrays are returned read-only so that no caller can change a
    cached curve.
    """
    acc = _accountant(Accountant.RDP, fixed_size)
    acc.compose(one_step.event())
    orders, curve = np.asarray(acc.orders), acc.rdp
    orders.flags.writeable = False
    curve.flags.writeable = False
    return orders, curve


def worst_epsilon(
    mechanisms: Iterable[Mechanism], delta: float, kind: Accountant = Accountant.RDP
) -> float:
    """The largest epsilon among independent parties (record-level DP: the worst client)."""
    values = [epsilon(m, delta, kind) for m in mechanisms]
    return max(values, default=0.0)


def calibrate_noise(
    epsilon_of: Callable[[float], float], target_epsilon: float, *, tol: float = 1e-3
) -> float:
    """The smallest noise multiplier whose ``epsilon_of(z)`` is at most ``target_epsilon``.

    ``epsilon_of`` must fall with ``z`` (it does for every mechanism above). Bisection in ``z``
    to a relative tolerance ``tol``; the answer errs on the private side.
    """
    if target_epsilon <= 0:
        raise PrivacyError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")
    high = MAX_NOISE_MULTIPLIER
    if epsilon_of(high) > target_epsilon:
        raise PrivacyError(
            f"privacy.target_epsilon={target_epsilon} cannot be reached with a noise multiplier "
            f"up to {MAX_NOISE_MULTIPLIER:g} in the configured rounds and steps; allow a larger "
            "epsilon, fewer rounds or local steps, or sample fewer clients or records per step"
        )
    low = 0.0
    while high - low > tol * high:
        mid = 0.5 * (low + high)
        if epsilon_of(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class SkellamSum:
    """``count`` rounds of the Skellam mechanism on a sum.

    Neighbouring inputs change the integer sum by a vector of L2 norm at most ``l2_sensitivity``
    and L1 norm at most ``l1_sensitivity`` (the caller's relation: under replace-one, twice one
    client's bounds); the sum carries ``Sk(mu, mu)`` noise per coordinate
    (``Poisson(mu) - Poisson(mu)``, variance ``2 mu``), all in quantisation levels.
    """

    l2_sensitivity: float
    l1_sensitivity: float
    mu: float
    count: int

    def rdp(self, orders: tuple[int, ...] = SKELLAM_ORDERS) -> np.ndarray:
        """RDP of the composition at integer ``orders`` (Agarwal et al. 2021, their
        multi-dimensional Skellam RDP bound, section 3).

        One round at order ``a``:
        ``a D2^2 / (4 mu) + min((2 a D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))``, times ``count``
        (RDP composes additively). The theorem is printed with ``(2a - 1) D2^2`` in one version
        and ``2a D2^2`` in another; we take the larger, which can only raise epsilon.
        """
        a = np.asarray(orders, dtype=np.float64)
        d2, d1, mu = self.l2_sensitivity, self.l1_sensitivity, self.mu
        one = a * d2 * d2 / (4 * mu) + np.minimum(
            (2 * a * d2 * d2 + 6 * d1) / (16 * mu * mu), 3 * d1 / (4 * mu)
        )
        return self.count * one


def skellam_epsilon(mechanism: SkellamSum | tuple[SkellamSum, ...], delta: float) -> float:
    """Epsilon at ``delta`` after ``mechanism`` (a tuple: its parts composed, their RDP curves
    added): the RDP curve through dp-accounting's conversion
    (``rdp_privacy_accountant.compute_epsilon``, the one its RdpAccountant uses); 0 before any
    round, inf without noise. No amplification by client sampling is claimed: dp-accounting's
    subsampled-RDP bounds cover the Gaussian only, so the epsilon is an upper bound for any
    sampling of clients."""
    parts = mechanism if isinstance(mechanism, tuple) else (mechanism,)
    parts = tuple(p for p in parts if p.count > 0)
    if not parts:
        return 0.0
    if any(p.mu <= 0.0 for p in parts):
        return math.inf
    curve = np.sum([p.rdp() for p in parts], axis=0)
    eps, _ = rdp_privacy_accountant.compute_epsilon(SKELLAM_ORDERS, curve.tolist(), delta)
    return float(eps)
