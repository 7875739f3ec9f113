"""Exact numbers for DP-FedAvg's clip, noise and adaptive clip (found by mutation testing).

The references are the formulas of McMahan et al. (2018) and Andrew et al. (2021) evaluated by
hand, at settings other than 1 so that a wrong exponent or factor shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedguard.algorithms.privacy import dp_fedavg


def test_update_noise_multiplier_at_z_two() -> None:
    # (z^-2 - (2 sigma_b)^-2)^-1/2 = (1/4 - 1/16)^-1/2 = (3/16)^-1/2
    assert dp_fedavg.update_noise_multiplier(2.0, 2.0) == pytest.approx((3 / 16) ** -0.5, rel=1e-15)
    assert dp_fedavg.update_noise_multiplier(0.5, 10.0) == pytest.approx(
        (4 - 1 / 400) ** -0.5, rel=1e-15
    )
    # the count query spends it all: (1/4 - 1/4) leaves nothing for the updates
    with pytest.raises(ValueError, match="clip_count_stddev"):
        dp_fedavg.update_noise_multiplier(2.0, 1.0)
    assert dp_fedavg.update_noise_multiplier(2.0, -1.0) == 2.0  # no count noise: unchanged


def test_clip_at_exactly_the_bound_keeps_the_update() -> None:
    u = torch.tensor([3.0, 4.0])
    out = dp_fedavg.clip_update(u, 5.0)
    assert out.unclipped is True and out.update is u and out.norm == 5.0
    longer = dp_fedavg.clip_update(u, 2.5)
    assert longer.unclipped is False and longer.norm == 5.0
    torch.testing.assert_close(longer.update, torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError):
        dp_fedavg.clip_update(u, -1.0)
    assert dp_fedavg.clip_update(u, 1e-12).norm == 5.0


def test_noisy_mean_adds_z_c_times_a_standard_normal_then_divides() -> None:
    total = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    out = dp_fedavg.noisy_mean(
        total,
        clip_norm=0.5,
        noise_multiplier=3.0,
        denominator=4.0,
        generator=torch.Generator().manual_seed(7),
    )
    noise = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = (total.double() + noise * 1.5) / 4.0
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=1e-6)
    # the noise is drawn in float64: over many coordinates, float32 draws would move some
    # results by one float32 step
    big = torch.linspace(-3.0, 3.0, 20_000)
    got = dp_fedavg.noisy_mean(
        big,
        clip_norm=0.7,
        noise_multiplier=1.3,
        denominator=3.0,
        generator=torch.Generator().manual_seed(11),
    )
    draws = torch.randn(20_000, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(got, ((big.double() + draws * (1.3 * 0.7)) / 3.0).float())


def test_next_clip_norm_adds_count_noise_before_dividing() -> None:
    noise = float(torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    clip, fraction = dp_fedavg.next_clip_norm(
        2.0,
        6.0,
        8,  # updates in the round, as many as the denominator: the centring cancels
        target_quantile=0.25,
        denominator=8.0,
        learning_rate=0.5,
        count_stddev=2.0,
        generator=torch.Generator().manual_seed(3),
    )
    expected_fraction = (6.0 + 2.0 * noise) / 8.0
    assert fraction == pytest.approx(expected_fraction, rel=1e-15)
    assert clip == pytest.approx(2.0 * math.exp(-0.5 * (expected_fraction - 0.25)), rel=1e-15)


def test_next_clip_norm_accepts_every_update_unclipped_and_refuses_more() -> None:
    # all 5 updates within the clip, no count noise: fraction (5 - 2.5) / 5 + 0.5 = 1
    clip, fraction = dp_fedavg.next_clip_norm(
        2.0,
        5.0,
        5,
        target_quantile=0.5,
        denominator=5.0,
        learning_rate=0.2,
        count_stddev=0.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert fraction == 1.0 and clip == pytest.approx(2.0 * math.exp(-0.2 * 0.5), rel=1e-15)
    for bad in (5.5, -0.5):
        with pytest.raises(ValueError, match="must lie in 0..num_updates=5"):
            dp_fedavg.next_clip_norm(
                2.0,
                bad,
                5,
                target_quantile=0.5,
                denominator=5.0,
                learning_rate=0.2,
                count_stddev=0.0,
                generator=torch.Generator().manual_seed(1),
            )
