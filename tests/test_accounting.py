"""Privacy accounting: fedguard's epsilons are dp-accounting's, and they move the right way."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedguard.algorithms.privacy import accounting
from fedguard.algorithms.privacy.accounting import Accountant, SampledGaussian


def _direct_rdp(z: float, q: float, steps: int, delta: float) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
        )
    )
    return acc.get_epsilon(delta)


def test_dpsgd_epsilon_equals_dp_accounting_rdp_and_pld() -> None:
    m = SampledGaussian(1.1, 1000, sampling_rate=0.01)
    assert accounting.epsilon(m, 1e-5) == pytest.approx(_direct_rdp(1.1, 0.01, 1000, 1e-5))
    assert accounting.epsilon(m, 1e-5) == pytest.approx(1.7118, abs=1e-3)
    direct = pld.PLDAccountant(value_discretization_interval=1e-4)
    direct.compose(m.event())
    via_pld = accounting.epsilon(m, 1e-5, Accountant.PLD)
    assert via_pld == pytest.approx(direct.get_epsilon(1e-5))
    assert via_pld < accounting.epsilon(m, 1e-5)  # PLD is tighter than RDP here (1.52 vs 1.71)


def test_fixed_size_sampling_uses_replace_one_rdp() -> None:
    m = SampledGaussian(1.0, 50, population=100, sample_size=10)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                100, 10, dp_accounting.GaussianDpEvent(1.0)
            ),
            50,
        )
    )
    assert accounting.epsilon(m, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    with pytest.raises(accounting.PrivacyError, match="PLD"):
        accounting.epsilon(m, 1e-5, Accountant.PLD)


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    steps = [accounting.epsilon(SampledGaussian(1.0, s, 0.05), 1e-5) for s in (10, 100, 1000)]
    assert steps[0] < steps[1] < steps[2]
    noise = [accounting.epsilon(SampledGaussian(z, 100, 0.05), 1e-5) for z in (0.7, 1.0, 2.0)]
    assert noise[0] > noise[1] > noise[2]
    assert accounting.epsilon(SampledGaussian(1.0, 0, 0.05), 1e-5) == 0.0
    assert math.isinf(accounting.epsilon(SampledGaussian(0.0, 10, 0.05), 1e-5))


def test_worst_epsilon_is_the_largest_party() -> None:
    parties = [SampledGaussian(1.0, 100, 0.02), SampledGaussian(1.0, 100, 0.2)]
    worst = accounting.worst_epsilon(parties, 1e-5)
    assert worst == pytest.approx(accounting.epsilon(parties[1], 1e-5))


def test_calibration_reaches_the_target_from_the_private_side() -> None:
    base = SampledGaussian(1.0, 500, 0.02)

    def epsilon_of(z: float) -> float:
        return accounting.epsilon(base.with_noise(z), 1e-5)

    for target in (1.0, 3.0, 8.0):
        z = accounting.calibrate_noise(epsilon_of, target)
        assert epsilon_of(z) <= target
        assert epsilon_of(z * 0.99) > target * 0.97  # not wastefully noisy
    with pytest.raises(accounting.PrivacyError, match="cannot be reached"):
        accounting.calibrate_noise(lambda z: 50.0, 1.0)
