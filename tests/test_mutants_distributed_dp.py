"""Exact numbers for the distributed Skellam mechanism (found by mutation testing).

Every expected value is worked out by hand from the formulas in the module docstring of
:mod:`fedguard.algorithms.privacy.distributed_dp` and of :class:`fedguard.algorithms.privacy.accounting.SkellamSum`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedguard.algorithms.privacy import accounting
from fedguard.algorithms.privacy import distributed_dp as ddp


def test_mechanism_settings_are_checked() -> None:
    assert ddp.Skellam(0.5, 1).beta == math.exp(-0.5)
    ddp.Skellam(1e-9, 1, beta=0.5)
    for args in ((0.0, 1), (-1.0, 1), (math.nan, 1), (1.0, 0)):
        with pytest.raises(ValueError):
            ddp.Skellam(*args)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="rounding failure"):
            ddp.Skellam(1.0, 2, beta=beta)


def test_fixed_point_leaves_eight_sigmas_of_headroom() -> None:
    # spread = 8 z sqrt(max(n, m) / m); levels = (2^(b-1) - 1 - n) / (n + spread)
    one_share = ddp.fixed_point(
        bits=16, clip_norm=2.0, num_clients=4, mechanism=ddp.Skellam(0.5, 1)
    )
    assert one_share.scale == pytest.approx(32763 / 12 / 2.0, rel=1e-15)  # spread 8
    assert (one_share.bits, one_share.clip_norm, one_share.max_weight) == (16, 2.0, 1)
    shared = ddp.fixed_point(bits=16, clip_norm=2.0, num_clients=4, mechanism=ddp.Skellam(0.5, 4))
    assert shared.scale == pytest.approx(32763 / 8 / 2.0, rel=1e-15)  # spread 4
    more = ddp.fixed_point(bits=16, clip_norm=2.0, num_clients=4, mechanism=ddp.Skellam(0.5, 8))
    assert more.scale == shared.scale  # max(n, m) / m = 1
    capped = ddp.fixed_point(bits=64, clip_norm=2.0, num_clients=4, mechanism=ddp.Skellam(0.5, 4))
    assert capped.scale == 2.0**20 / 2.0


def test_fixed_point_accepts_one_level_and_refuses_less() -> None:
    # n = m = 3: (127 - 3) / (3 + 8 z) = 1 at z = 15.125
    edge = ddp.fixed_point(bits=8, clip_norm=1.0, num_clients=3, mechanism=ddp.Skellam(15.125, 3))
    assert edge.scale == 1.0
    with pytest.raises(ValueError, match="raise secure_aggregation.bits"):
        ddp.fixed_point(bits=8, clip_norm=1.0, num_clients=3, mechanism=ddp.Skellam(15.2, 3))
    for kwargs in (dict(clip_norm=0.0, num_clients=3), dict(clip_norm=1.0, num_clients=0)):
        with pytest.raises(ValueError):
            ddp.fixed_point(bits=16, mechanism=ddp.Skellam(1.0, 1), **kwargs)
    # the plain encoding's bound is checked for weight 1: 127 // 40 - 1 = 2 levels
    forty = ddp.fixed_point(bits=8, clip_norm=1.0, num_clients=40, mechanism=ddp.Skellam(1e-6, 40))
    assert forty.scale == pytest.approx(87 / (40 + 8e-6), rel=1e-12)
    with pytest.raises(ValueError):  # the plain encoding's own bound: 127 // 200 - 1 < 1
        ddp.fixed_point(bits=8, clip_norm=1.0, num_clients=200, mechanism=ddp.Skellam(1e-6, 1))


def test_sensitivities() -> None:
    beta = math.exp(-0.5)  # sqrt(2 ln(1 / beta)) = 1
    # c = 10, d = 4: 100 + 1 + 1 * (10 + 1) = 112 < (10 + 2)^2
    assert ddp.l2_sensitivity(10.0, 4, beta) == pytest.approx(math.sqrt(112), rel=1e-15)
    # c = 3, d = 1, sqrt(2 ln(1/beta)) = 2: 9 + 0.25 + 2 * 3.5 = 16.25 > (3 + 1)^2 = 16
    assert ddp.l2_sensitivity(3.0, 1, math.exp(-2.0)) == pytest.approx(4.0, rel=1e-15)
    assert ddp.l2_sensitivity(0.0, 1, math.exp(-2.0)) == pytest.approx(1.0, rel=1e-15)
    # c = 5, d = 9, beta = e^-8 (factor 4): 25 + 2.25 + 4 * 6.5 = 53.25 < 64
    assert ddp.l2_sensitivity(5.0, 9, math.exp(-8.0)) == pytest.approx(math.sqrt(53.25))
    assert ddp.l1_sensitivity(3.0, 16) == 9.0  # min(9, 4 * 3)
    assert ddp.l1_sensitivity(10.0, 16) == 40.0  # min(100, 4 * 10)


def test_client_rate_splits_the_variance_over_the_shares() -> None:
    # lam = (z c)^2 / (2 m): (2 * 3)^2 / 8
    assert ddp.client_rate(ddp.Skellam(2.0, 4), 3.0) == 4.5
    assert ddp.client_rate(ddp.Skellam(0.5, 1), 10.0) == 12.5


def test_conditional_rounding_is_exact_on_integers_and_bounded() -> None:
    g = np.random.default_rng(0)
    q = ddp.conditional_round(np.array([3.0, -4.0]), 5.0, g)  # norm exactly the bound
    np.testing.assert_array_equal(q, [3, -4])
    assert q.dtype == np.int64
    with pytest.raises(RuntimeError, match="no rounding within norm"):
        ddp.conditional_round(np.array([3.0, 4.0]), 4.99, g)
    # 0.5 each: a try passes when at most one coordinate rounds up
    for seed in range(5):
        r = ddp.conditional_round(np.full(4, 0.5), 1.0, np.random.default_rng(seed))
        assert int(r.sum()) <= 1 and set(r.tolist()) <= {0, 1}
    # unbiased away from the bound: the mean of many roundings of 0.25 is 0.25
    many = ddp.conditional_round(np.full(100_000, 0.25), 1e9, np.random.default_rng(1))
    assert many.mean() == pytest.approx(0.25, abs=0.01)
    neg = ddp.conditional_round(np.full(100_000, -0.25), 1e9, np.random.default_rng(2))
    assert set(np.unique(neg).tolist()) == {-1, 0}


def test_skellam_noise_is_centred_with_variance_twice_the_rate() -> None:
    noise = ddp.skellam_noise(200_000, 3.0, np.random.default_rng(0))
    assert noise.dtype == np.int64 and noise.shape == (200_000,)
    assert abs(noise.mean()) < 0.03
    assert noise.var() == pytest.approx(6.0, rel=0.03)


def test_encode_scales_rounds_noises_and_appends_one() -> None:
    mech = ddp.Skellam(1e-9, 1)  # Poisson rates ~1e-6: no noise in practice
    fp = ddp.fixed_point(bits=32, clip_norm=1.0, num_clients=1, mechanism=mech)
    assert fp.scale == 2.0**20
    out = ddp.encode(np.array([0.5, -0.5, 0.0]), fp, mech, np.random.default_rng(0))
    assert out.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(out, [2**19, 2**32 - 2**19, 0, 1])
    # clipped: [3, 4] -> [0.6, 0.8] before scaling
    long = ddp.encode(np.array([3.0, 4.0]), fp, mech, np.random.default_rng(0))
    signed = long.astype(np.int64)
    assert abs(signed[0] - 0.6 * 2**20) <= 1 and abs(signed[1] - 0.8 * 2**20) <= 1
    assert signed[2] == 1
    # with noise: std z s C = 0.01 * 2^20 / sqrt(1) per coordinate around the value
    noisy = ddp.Skellam(0.01, 1)
    fp2 = ddp.fixed_point(bits=32, clip_norm=1.0, num_clients=1, mechanism=noisy)
    levels = fp2.scale * fp2.clip_norm
    enc = ddp.encode(np.zeros(20_000), fp2, noisy, np.random.default_rng(3))
    values = enc[:-1].view(np.int32).astype(np.float64)
    assert values.std() == pytest.approx(0.01 * levels, rel=0.03)
    assert abs(values.mean()) < 0.05 * 0.01 * levels


def test_skellam_rdp_is_agarwal_et_al_bound_times_the_rounds() -> None:
    m = accounting.SkellamSum(l2_sensitivity=2.0, l1_sensitivity=3.0, mu=10.0, count=5)
    # a = 2: 2*4/40 + min((16 + 18) / 1600, 9 / 40); a = 4: 16/40 + min(50 / 1600, 9 / 40)
    np.testing.assert_allclose(m.rdp((2, 4)), [5 * 0.22125, 5 * 0.43125], rtol=1e-14)
    small = accounting.SkellamSum(l2_sensitivity=1.0, l1_sensitivity=1.0, mu=0.1, count=1)
    # a = 2: 2/0.4 + min(10/0.16, 3/0.4) = 5 + 7.5
    np.testing.assert_allclose(small.rdp((2,)), [12.5], rtol=1e-14)
    assert accounting.SKELLAM_ORDERS[0] == 2 and accounting.SKELLAM_ORDERS[-1] == 256
    assert len(m.rdp()) == 255


def test_skellam_epsilon_is_dp_accounting_conversion_of_the_rdp_curve() -> None:
    m = accounting.SkellamSum(l2_sensitivity=3.0, l1_sensitivity=9.0, mu=50.0, count=20)
    orders = list(range(2, 257))
    expected, _ = rdp_privacy_accountant.compute_epsilon(orders, m.rdp().tolist(), 1e-5)
    assert accounting.skellam_epsilon(m, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < math.inf
    assert accounting.skellam_epsilon(accounting.SkellamSum(3.0, 9.0, 50.0, 0), 1e-5) == 0.0
    assert math.isinf(accounting.skellam_epsilon(accounting.SkellamSum(3.0, 9.0, 0.0, 20), 1e-5))
    low = accounting.SkellamSum(3.0, 9.0, 0.5, 1)  # little noise, finite epsilon all the same
    expected_low, _ = rdp_privacy_accountant.compute_epsilon(orders, low.rdp().tolist(), 1e-5)
    assert accounting.skellam_epsilon(low, 1e-5) == pytest.approx(expected_low, rel=1e-12)
    assert math.isfinite(expected_low)
    one = accounting.SkellamSum(3.0, 9.0, 50.0, 1)
    assert accounting.skellam_epsilon(one, 1e-5) > 0.0
    more = accounting.skellam_epsilon(accounting.SkellamSum(3.0, 9.0, 50.0, 40), 1e-5)
    assert more > expected


def test_encode_noise_and_bound_scale_with_the_clip_norm() -> None:
    """With C = 4 the update's norm is s C levels and the noise std z s C (not z s / C)."""
    noisy = ddp.Skellam(0.01, 1)
    fp = ddp.fixed_point(bits=32, clip_norm=4.0, num_clients=1, mechanism=noisy)
    levels = fp.scale * 4.0
    enc = ddp.encode(np.zeros(20_000), fp, noisy, np.random.default_rng(3))
    values = enc[:-1].view(np.int32).astype(np.float64)
    assert values.std() == pytest.approx(0.01 * levels, rel=0.03)
    # an update at the clip norm is rounded within the bound for s C levels (s / C would be
    # 16 times smaller and refuse it)
    quiet = ddp.Skellam(1e-9, 1)
    fp = ddp.fixed_point(bits=32, clip_norm=4.0, num_clients=1, mechanism=quiet)
    out = ddp.encode(np.array([2.4, 3.2]), fp, quiet, np.random.default_rng(0)).view(np.int32)
    assert abs(out[0] - 0.6 * fp.scale * 4.0) <= 1 and abs(out[1] - 0.8 * fp.scale * 4.0) <= 1
