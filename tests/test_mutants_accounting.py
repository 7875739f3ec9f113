"""The accounting's events, accountants and noise calibration, checked piece by piece (found by
mutation testing). The calibration is checked on closed-form epsilon curves, so that it runs in
milliseconds and its answer is known exactly."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedguard.algorithms.privacy import accounting
from fedguard.algorithms.privacy.accounting import Accountant, SampledGaussian


def test_events_describe_the_sampling() -> None:
    gauss = dp_accounting.GaussianDpEvent(1.5)
    assert SampledGaussian(1.5, 4).event() == dp_accounting.SelfComposedDpEvent(gauss, 4)
    assert SampledGaussian(1.5, 4, sampling_rate=1.0).event() == (
        dp_accounting.SelfComposedDpEvent(gauss, 4)
    )
    assert SampledGaussian(1.5, 4, sampling_rate=0.25).event() == (
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.25, gauss), 4)
    )
    assert SampledGaussian(1.5, 4, population=50, sample_size=5).event() == (
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(50, 5, gauss), 4
        )
    )
    assert SampledGaussian(1.5, 0, 0.25).event() == dp_accounting.NoOpDpEvent()
    assert SampledGaussian(1.5, 4, population=50, sample_size=5).fixed_size
    assert not SampledGaussian(1.5, 4, 0.25).fixed_size


def test_with_noise_keeps_everything_else() -> None:
    m = SampledGaussian(1.5, 7, 0.3, population=40, sample_size=12)
    assert m.with_noise(2.5) == SampledGaussian(2.5, 7, 0.3, population=40, sample_size=12)
    assert m.with_count(3) == SampledGaussian(1.5, 3, 0.3, population=40, sample_size=12)


def test_the_cached_one_step_curve_is_read_only_and_that_of_one_step() -> None:
    """The cache hands out the same arrays to every caller, so they must be read-only; the
    curve is dp-accounting's for one step of the mechanism."""
    step = SampledGaussian(1.3, 1, 0.2)
    orders, curve = accounting._unit_rdp(step, False)
    direct = rdp.RdpAccountant()
    direct.compose(step.event())
    assert list(orders) == list(direct.orders) and len(orders) > 10
    assert curve.tolist() == list(direct.rdp)
    for array in (orders, curve):
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 7.0
    assert accounting._unit_rdp(step, False)[1] is curve


def test_accountants() -> None:
    assert isinstance(accounting._accountant(Accountant.RDP, False), rdp.RdpAccountant)
    assert isinstance(accounting._accountant(Accountant.PLD, False), pld.PLDAccountant)
    fixed = accounting._accountant(Accountant.RDP, True)
    assert isinstance(fixed, rdp.RdpAccountant)
    assert fixed.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_ONE
    plain = accounting._accountant(Accountant.RDP, False)
    assert plain.neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    with pytest.raises(accounting.PrivacyError, match="PLD"):
        accounting._accountant(Accountant.PLD, True)
    assert accounting.PLD_DISCRETIZATION == 1e-4
    assert accounting.MAX_NOISE_MULTIPLIER == 100.0


def test_epsilon_of_one_unsampled_gaussian_release() -> None:
    # one Gaussian release at z = 2 (q = 1), checked against dp-accounting's own RDP accountant
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(2.0))
    assert accounting.epsilon(SampledGaussian(2.0, 1), 1e-5) == pytest.approx(
        direct.get_epsilon(1e-5), rel=1e-12
    )
    assert math.isinf(accounting.epsilon(SampledGaussian(-1.0, 3), 1e-5))
    assert accounting.epsilon(SampledGaussian(0.0, 0), 1e-5) == 0.0
    assert accounting.worst_epsilon([], 1e-5) == 0.0
    two = [SampledGaussian(2.0, 1), SampledGaussian(4.0, 1)]
    assert accounting.worst_epsilon(two, 1e-5) == accounting.epsilon(two[0], 1e-5)
    by_pld = accounting.worst_epsilon(two, 1e-5, Accountant.PLD)
    assert by_pld == accounting.epsilon(two[0], 1e-5, Accountant.PLD)
    assert by_pld != accounting.epsilon(two[0], 1e-5)


def test_calibration_on_a_closed_form_curve() -> None:
    # epsilon(z) = 10 / z: the smallest z with epsilon <= 2 is 5, found from above within tol
    calls: list[float] = []

    def eps(z: float) -> float:
        calls.append(z)
        return 10.0 / z if z > 0 else math.inf

    z = accounting.calibrate_noise(eps, 2.0)
    assert 5.0 <= z <= 5.0 * (1 + 1e-3)
    assert calls[0] == 100.0  # the feasibility check at the largest multiplier
    coarse = accounting.calibrate_noise(eps, 2.0, tol=0.1)
    assert coarse == 5.078125  # 50, 25, 12.5, 6.25, 3.125, 4.6875, 5.46875, 5.078125: stop
    # reachable exactly at the largest multiplier (10 / 100 = 0.1): not refused
    assert accounting.calibrate_noise(eps, 0.1) == pytest.approx(100.0, rel=1e-3)
    with pytest.raises(accounting.PrivacyError, match="cannot be reached"):
        accounting.calibrate_noise(eps, 0.099)
    for target in (0.0, -1.0):
        with pytest.raises(accounting.PrivacyError, match="must be > 0"):
            accounting.calibrate_noise(eps, target)


def test_accounted_multiplier_is_the_noise_over_the_sensitivity() -> None:
    assert accounting.accounted_multiplier(3.0, 1.5) == 2.0
    assert accounting.accounted_multiplier(1.2, 0.4) == pytest.approx(3.0, rel=1e-15)
    for bad in (0.0, -2.0):
        with pytest.raises(accounting.PrivacyError, match="L2 sensitivity must be positive"):
            accounting.accounted_multiplier(1.0, bad)


def test_a_tuple_of_mechanisms_composes_its_parts() -> None:
    # rounds at the same noise, split in two parts, are the rounds together
    split = (SampledGaussian(2.5, 2, 0.2), SampledGaussian(2.5, 3, 0.2))
    assert accounting.epsilon(split, 1e-5) == pytest.approx(
        accounting.epsilon(SampledGaussian(2.5, 5, 0.2), 1e-5), rel=1e-9
    )
    parts = (
        accounting.SkellamSum(2.0, 3.0, 40.0, 2),
        accounting.SkellamSum(2.0, 3.0, 40.0, 3),
        accounting.SkellamSum(2.0, 3.0, 0.0, 0),  # never ran: not counted, not noiseless
    )
    whole = accounting.skellam_epsilon(accounting.SkellamSum(2.0, 3.0, 40.0, 5), 1e-5)
    assert accounting.skellam_epsilon(parts, 1e-5) == pytest.approx(whole, rel=1e-12)
    assert 0 < whole < math.inf
    assert accounting.skellam_epsilon(accounting.SkellamSum(2.0, 3.0, 0.0, 0), 1e-5) == 0.0


def test_calibration_takes_a_multiplier_that_reaches_the_target_exactly() -> None:
    # epsilon 1.0 from z = 50 on, 2.0 below: the smallest z with epsilon <= 1.0 is 50, which
    # the bisection's first midpoint hits exactly
    def step(z: float) -> float:
        return 1.0 if z >= 50.0 else 2.0

    assert accounting.calibrate_noise(step, 1.0) == 50.0
