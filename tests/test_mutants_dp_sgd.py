"""DP-SGD's sampling, step count, clip factors and noise with exact numbers (found by mutation
testing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedguard.client import dp_sgd, per_example_grads, training
from fedguard.data import augment
from fedguard.models import torch_models
from fedguard.models.adapter import TorchModel


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


def test_draw_noise_is_standard_normal_from_the_generator_in_the_dtype() -> None:
    torch.manual_seed(0)  # the global generator is not the one drawn from
    for dtype in (torch.float64, torch.float32):
        z = dp_sgd.draw_noise(5, dtype, torch.Generator().manual_seed(11))
        want = torch.randn(5, generator=torch.Generator().manual_seed(11), dtype=dtype)
        assert z.dtype == dtype and torch.equal(z, want)


def test_a_noiseless_step_draws_no_noise() -> None:
    """std 0 returns the plain mean without touching the generator, so that the Poisson samples
    of later steps are those of a run without noise."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    dp_sgd.noisy_mean(_batch([a]), 0.0, 4.0, g)
    assert torch.equal(
        torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(9))
    )


# --- train() against a hand-written loop: Poisson batches, augmentation, SGD on the clipped
# (C = inf) mean over the expected batch size, the loss of the non-empty batches, and the
# report of what ran.


def _logistic(seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    return TorchModel(torch_models.logistic_regression((1, 6, 6), 3))


def _reference_train(module, x, y, *, lr, q, steps, seed, augment_fn=None):
    """Plain autograd: per step, Poisson indices from ``torch.rand(n) < q``, the augmentation of
    a non-empty batch, and ``p -= lr * grad(sum of NLL) / (q n)``; returns the mean over
    non-empty batches of the batch-mean NLL and the batch sizes."""
    g = torch.Generator().manual_seed(seed)
    params = list(module.parameters())
    n = int(y.shape[0])
    losses, sizes = [], []
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=g) < q).squeeze(1)
        sizes.append(int(idx.numel()))
        if idx.numel() == 0:
            continue  # a zero gradient: no move without noise
        xb = x[idx] if augment_fn is None else augment_fn(x[idx], g)
        loss = F.nll_loss(torch.log_softmax(module(xb), -1), y[idx], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p -= lr * gr / (q * n)
        losses.append(float(loss.detach()) / idx.numel())
    return (sum(losses) / len(losses) if losses else math.nan), sizes


@pytest.mark.parametrize("kind", ["none", "image"])
def test_train_is_the_hand_written_loop(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    cfg = training.LocalTraining(lr=0.3, epochs=4, batch_size=2, augment=kind)  # q 0.2, 20 steps
    model = _logistic()
    reference = copy.deepcopy(model.module)
    model.train_mode(False)
    stats = dp_sgd.train(
        model, x, y, cfg, dp_sgd.DPSGD(math.inf, 0.0), generator=torch.Generator().manual_seed(5)
    )
    assert model.module.training  # trains in training mode
    loss, sizes = _reference_train(
        reference, x, y, lr=0.3, q=0.2, steps=20, seed=5, augment_fn=augment.get(kind)
    )
    assert 0 in sizes and 1 in sizes and max(sizes) > 1  # empty and one-example batches too
    assert stats.loss == pytest.approx(loss, rel=1e-5)
    for p, r in zip(model.module.parameters(), reference.parameters(), strict=True):
        assert float((p.detach() - r.detach()).abs().max()) < 1e-5
    assert (stats.steps, stats.num_examples) == (20, 10)


def test_train_reports_the_rate_noise_and_clip_it_ran_with() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    cfg = training.LocalTraining(lr=0.3, epochs=2, batch_size=4)
    stats = dp_sgd.train(
        _logistic(), x, y, cfg, dp_sgd.DPSGD(2.5, 0.7), generator=torch.Generator().manual_seed(1)
    )
    assert isinstance(stats, dp_sgd.DPTrainStats)
    assert (stats.sampling_rate, stats.noise_multiplier, stats.max_grad_norm) == (0.4, 0.7, 2.5)
    assert (stats.steps, stats.num_examples) == (4, 10)  # 2 epochs of round(10 / 4) = 2 steps
    assert math.isfinite(stats.loss)


def test_a_single_example_trains_and_all_empty_batches_give_a_nan_loss() -> None:
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2])
    cfg = training.LocalTraining(lr=0.3, epochs=1, batch_size=1)  # q = 1: the one example
    model = _logistic()
    before = model.get_flat()
    stats = dp_sgd.train(
        model, x, y, cfg, dp_sgd.DPSGD(math.inf, 0.0), generator=torch.Generator().manual_seed(1)
    )
    assert stats.steps == 1 and stats.num_examples == 1 and math.isfinite(stats.loss)
    assert not torch.equal(model.get_flat(), before)
    with pytest.raises(ValueError, match="This client holds no training examples"):
        dp_sgd.train(model, x[:0], y[:0], cfg, dp_sgd.DPSGD(1.0, 0.0), generator=torch.Generator())
    # 20 examples at q = 0.05, one step, a seed whose only batch is empty: the loss is NaN
    x20 = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    y20 = torch.zeros(20, dtype=torch.int64)
    seed = next(
        s
        for s in range(100)
        if not (torch.rand(20, generator=torch.Generator().manual_seed(s)) < 0.05).any()
    )
    one = training.LocalTraining(lr=0.3, batch_size=1, max_steps=1)
    stats = dp_sgd.train(
        _logistic(),
        x20,
        y20,
        one,
        dp_sgd.DPSGD(1.5, 0.0),
        generator=torch.Generator().manual_seed(seed),
    )
    assert stats.steps == 1 and math.isnan(stats.loss)


def test_instance_norm_with_running_statistics_is_refused_by_name() -> None:
    tracked = TorchModel(
        nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.InstanceNorm2d(2, affine=True, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(32, 2),
        )
    )
    with pytest.raises(ValueError) as info:
        dp_sgd.check_compatible(tracked)
    assert str(info.value).startswith(
        "DP-SGD cannot train layer 1 (InstanceNorm2d): its running statistics are averages over "
        "the batch that leave the client unnoised."
    )
    plain = TorchModel(
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True), nn.Flatten(), nn.Linear(32, 2)
        )
    )
    dp_sgd.check_compatible(plain)
