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
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

MAX_NOISE_MULTIPLIER = 100.0
PLD_DISCRETIZATION = 1e-4


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
        if self.fixed_size:
            assert self.population is not None and self.sample_size is not None
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


def _accountant(kind: Accountant, fixed_size: bool) -> dp_accounting.PrivacyAccountant:
    if fixed_size:
        if kind is Accountant.PLD:
            raise PrivacyError(
                "privacy.accountant: the PLD accountant does not support fixed-size client "
                'sampling; use privacy.accountant = "rdp" or server.sampling = "poisson"'
            )
        return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    if kind is Accountant.PLD:
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return rdp.RdpAccountant()


def epsilon(mechanism: SampledGaussian, delta: float, kind: Accountant = Accountant.RDP) -> float:
    """Epsilon at ``delta`` after ``mechanism``; 0 before any step, inf without noise."""
    if mechanism.count == 0:
        return 0.0
    if mechanism.noise_multiplier <= 0.0:
        return math.inf
    acc = _accountant(kind, mechanism.fixed_size)
    acc.compose(mechanism.event())
    return float(acc.get_epsilon(delta))


def worst_epsilon(
    mechanisms: Iterable[SampledGaussian], delta: float, kind: Accountant = Accountant.RDP
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
