"""DP-SGD's sampling, step count, clip factors and noise with exact numbers (found by mutation
testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.client import dp_sgd, per_example_grads, training


def test_sampling_rate_and_steps() -> None:
    assert dp_sgd.sampling_rate(200, 30) == 0.15
    assert dp_sgd.sampling_rate(20, 30) == 1.0  # capped
    assert dp_sgd.sampling_rate(1, 1) == 1.0
    assert dp_sgd.steps_per_epoch(200, 30) == 7  # round(6.67)
    assert dp_sgd.steps_per_epoch(210, 20) == 10  # round(10.5) is 10 (to even)
    assert dp_sgd.steps_per_epoch(230, 20) == 12  # round(11.5) is 12
    assert dp_sgd.steps_per_epoch(10, 30) == 1  # at least one step
    assert dp_sgd.steps_per_epoch(1, 1) == 1
    for n, b in ((0, 5), (5, 0), (-1, 5)):
        with pytest.raises(ValueError, match="n >= 1 and batch_size >= 1"):
            dp_sgd.sampling_rate(n, b)
        with pytest.raises(ValueError, match="n >= 1 and batch_size >= 1"):
            dp_sgd.steps_per_epoch(n, b)


def test_num_steps_is_epochs_times_steps_capped_at_max_steps() -> None:
    cfg = training.LocalTraining(epochs=3, batch_size=30)
    assert dp_sgd.num_steps(200, cfg) == 21
    assert dp_sgd.num_steps(200, training.LocalTraining(epochs=3, batch_size=30, max_steps=5)) == 5
    assert (
        dp_sgd.num_steps(200, training.LocalTraining(epochs=3, batch_size=30, max_steps=50)) == 21
    )
    assert (
        dp_sgd.num_steps(200, training.LocalTraining(epochs=3, batch_size=30, max_steps=21)) == 21
    )


def test_poisson_sample_draws_each_index_with_probability_q() -> None:
    g = torch.Generator().manual_seed(4)
    picked = dp_sgd.poisson_sample(10, 0.3, g)
    u = torch.rand(10, generator=torch.Generator().manual_seed(4))
    assert picked.tolist() == [i for i in range(10) if u[i] < 0.3]
    assert picked.dtype == torch.int64 and picked.ndim == 1
    assert dp_sgd.poisson_sample(50, 1.0, g).tolist() == list(range(50))
    assert dp_sgd.poisson_sample(50, 0.0, g).tolist() == []
    big = dp_sgd.poisson_sample(100_000, 0.2, g)
    assert len(big) == pytest.approx(20_000, abs=600)


def test_clip_factors_are_min_one_c_over_norm_plus_epsilon() -> None:
    norms = torch.tensor([0.0, 1.0, 2.0, 8.0], dtype=torch.float64)
    out = per_example_grads.clip_factors(norms, 2.0)
    expected = torch.tensor([1.0, 1.0, 2.0 / (2.0 + 1e-6), 2.0 / (8.0 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    assert per_example_grads.CLIP_EPSILON == 1e-6
    inf = per_example_grads.clip_factors(norms, float("inf"))
    torch.testing.assert_close(inf, torch.ones(4, dtype=torch.float64))


def _batch(grads: list[torch.Tensor]) -> per_example_grads.ClippedBatch:
    empty = torch.zeros(0)
    return per_example_grads.ClippedBatch(grads, empty, empty, torch.zeros(()))


def test_noisy_mean_is_one_draw_in_parameter_order_scaled_by_std() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([10.0, -10.0, 0.5], dtype=torch.float64)
    out = dp_sgd.noisy_mean(_batch([a, b]), 0.7, 4.0, torch.Generator().manual_seed(9))
    z = torch.randn(7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(out[0], (a + 0.7 * z[:4].view(2, 2)) / 4.0, rtol=1e-15, atol=0)
    torch.testing.assert_close(out[1], (b + 0.7 * z[4:]) / 4.0, rtol=1e-15, atol=0)
    assert out[0].shape == (2, 2) and out[0].dtype == torch.float64
    # no noise: the plain mean, for std 0 and below
    for std in (0.0, -1.0):
        plain = dp_sgd.noisy_mean(_batch([a, b]), std, 4.0, torch.Generator().manual_seed(9))
        torch.testing.assert_close(plain[0], a / 4.0, rtol=0, atol=0)
        torch.testing.assert_close(plain[1], b / 4.0, rtol=0, atol=0)
    # a tiny std still draws noise
    tiny = dp_sgd.noisy_mean(_batch([a]), 1e-3, 1.0, torch.Generator().manual_seed(9))
    assert not torch.equal(tiny[0], a)
