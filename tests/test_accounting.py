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


@pytest.mark.parametrize("fixed_size", [True, False])
def test_composed_parts_equal_dp_accountings_own_composition(fixed_size: bool) -> None:
    """The cached one-step curves, scaled by each part's count, give dp-accounting's epsilon for
    the composed event, in any order of asking (the cache must not leak one part into another)."""
    sampling = {"population": 60, "sample_size": 9} if fixed_size else {"sampling_rate": 0.15}
    parts = (
        SampledGaussian(0.9, 3, **sampling),
        SampledGaussian(1.7, 11, **sampling),
        SampledGaussian(0.9, 5, **sampling),
    )
    relation = accounting.relation(fixed_size)
    for mechanism in (parts, parts[1], parts[::-1], parts[:2]):
        tup = mechanism if isinstance(mechanism, tuple) else (mechanism,)
        direct = rdp.RdpAccountant(neighboring_relation=relation)
        direct.compose(dp_accounting.ComposedDpEvent([p.event() for p in tup]))
        assert accounting.epsilon(mechanism, 2e-6) == pytest.approx(
            direct.get_epsilon(2e-6), rel=1e-12
        )
    # the same parameters with more steps cost more, never the cached value of fewer steps
    fewer = accounting.epsilon(parts[1], 2e-6)
    assert accounting.epsilon(parts[1].with_count(22), 2e-6) > fewer


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
