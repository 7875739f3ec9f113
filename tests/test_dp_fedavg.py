"""DP-FedAvg's two halves: the client's clip and the server's noise and adaptive clip."""

from __future__ import annotations

import math

import pytest
import torch

from fedguard.algorithms.privacy import dp_fedavg


def test_clip_bounds_the_norm_and_keeps_short_updates() -> None:
    long = torch.tensor([3.0, 4.0])  # norm 5
    out = dp_fedavg.clip_update(long, 1.0)
    assert not out.unclipped and out.norm == pytest.approx(5.0)
    torch.testing.assert_close(out.update, torch.tensor([0.6, 0.8]))
    short = dp_fedavg.clip_update(long, 10.0)
    assert short.unclipped and short.update is long
    with pytest.raises(ValueError, match="positive"):
        dp_fedavg.clip_update(long, 0.0)


def test_noise_std_matches_the_configuration() -> None:
    total = torch.zeros(200_000)
    out = dp_fedavg.noisy_mean(
        total,
        clip_norm=0.5,
        noise_multiplier=1.2,
        denominator=10.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = 1.2 * 0.5 / 10.0
    assert float(out.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(out.mean())) < 5 * expected / math.sqrt(out.numel())


def test_noisy_mean_of_clipped_sum_without_noise_is_exact() -> None:
    ups = [dp_fedavg.clip_update(torch.tensor(v), 1.0).update for v in ([3.0, 4.0], [0.1, 0.2])]
    out = dp_fedavg.noisy_mean(
        torch.stack(ups).sum(0),
        clip_norm=1.0,
        noise_multiplier=0.0,
        denominator=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, torch.tensor([0.35, 0.5]))


def test_update_noise_multiplier_follows_andrew_et_al() -> None:
    # (z^-2 - (2 sigma_b)^-2)^-1/2 with z = 1, sigma_b = 5: (1 - 0.01)^-1/2
    assert dp_fedavg.update_noise_multiplier(1.0, 5.0) == pytest.approx(0.99**-0.5)
    assert dp_fedavg.update_noise_multiplier(1.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="clip_count_stddev"):
        dp_fedavg.update_noise_multiplier(1.0, 0.4)


def test_adaptive_clip_moves_geometrically_to_the_target_quantile() -> None:
    g = torch.Generator().manual_seed(0)
    kwargs = dict(target_quantile=0.5, denominator=10.0, learning_rate=0.2, count_stddev=0.0)
    grown, fraction = dp_fedavg.next_clip_norm(1.0, 2.0, 10, generator=g, **kwargs)
    assert fraction == pytest.approx(0.2)
    assert grown == pytest.approx(math.exp(0.2 * 0.3))  # too few unclipped: the clip grows
    shrunk, _ = dp_fedavg.next_clip_norm(1.0, 9.0, 10, generator=g, **kwargs)
    assert shrunk == pytest.approx(math.exp(-0.2 * 0.4))
    # simulated rounds: norms ~ |N(0, 1)| * 3, the clip settles near their median (2.02)
    norms = torch.randn(400, generator=torch.Generator().manual_seed(1)).abs() * 3
    clip = 0.1
    for r in range(200):
        batch = norms[(r * 10) % 400 : (r * 10) % 400 + 10]
        clip, _ = dp_fedavg.next_clip_norm(
            clip, float((batch <= clip).sum()), len(batch), generator=g, **kwargs
        )
    assert clip == pytest.approx(float(norms.median()), rel=0.25)
