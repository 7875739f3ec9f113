"""DP-SGD inside a client: clipping, noise, Poisson sampling, the hook and vmap paths, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedguard.client import dp_sgd, per_example_grads, training
from fedguard.models import torch_models
from fedguard.models.adapter import TorchModel


def _data(shape: tuple[int, ...], n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _group_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 3),
    )


def _tokens_mlp() -> nn.Module:
    """A Linear on [B, 4 tokens, 16]: 4 * (16 + 16) < 16 * 16, so its norm is the ghost norm."""
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _strided_convs() -> nn.Module:
    """Conv1d with stride, padding and dilation; a Conv2d small enough for the ghost norm."""
    return nn.Sequential(
        nn.Conv1d(3, 16, 3, stride=2, padding=1, dilation=2),  # [B, 3, 20] -> [B, 16, 9]
        nn.ReLU(inplace=True),
        nn.Unflatten(2, (3, 3)),
        nn.Conv2d(16, 32, 3, padding=1),  # T = 9: 9 * (144 + 32) < 144 * 32
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 9, 2),
    )


# (builder, input shape of one example, classes), all small enough for a fast test.
MODELS = {
    "image_cnn": (lambda: torch_models.image_cnn((1, 28, 28), 2), (1, 28, 28), 2),
    "dp_image_cnn": (lambda: torch_models.dp_image_cnn((1, 28, 28), 2), (1, 28, 28), 2),
    "speech_cnn": (lambda: torch_models.speech_cnn((1, 40, 20), 5), (1, 40, 20), 5),
    "brief_speech_cnn": (lambda: torch_models.brief_speech_cnn((1, 40, 20), 5), (1, 40, 20), 5),
    "logistic_regression": (lambda: torch_models.logistic_regression((1, 6, 6), 3), (1, 6, 6), 3),
    "tokens_mlp": (_tokens_mlp, (4, 16), 3),
    "strided_convs": (_strided_convs, (3, 20), 2),
    "group_norm": (_group_norm_cnn, (1, 12, 12), 3),
}
HOOKABLE = [name for name in MODELS if name != "group_norm"]


def _model(name: str, seed: int = 0) -> tuple[TorchModel, torch.Tensor, torch.Tensor]:
    build, shape, classes = MODELS[name]
    torch.manual_seed(seed)
    x, y = _data(shape, 12, classes, seed)
    return TorchModel(build()), x, y


def _reference_grads(model: TorchModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``[B, P]`` from torch.func, flattened in ``trainable()`` order."""
    module = model.module
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(s.param)] for s in model.trainable()]
    params = {n: p.detach() for n, p in module.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, p, (xi[None],))
        return F.nll_loss(torch.log_softmax(out, -1), yi[None], reduction="sum")

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].flatten(1) for n in order], dim=1)


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_without_noise_or_clipping_a_step_is_an_sgd_step(name: str) -> None:
    model, x, y = _model(name)
    plain = TorchModel(copy.deepcopy(model.module))
    cfg = training.LocalTraining(lr=0.5, batch_size=len(y))  # q = 1: the batch is all of x
    dp = dp_sgd.DPSGD(max_grad_norm=math.inf, noise_multiplier=0.0)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))

    loss = F.nll_loss(plain.log_probabilities(x, training=True), y, reduction="sum") / len(y)
    loss.backward()
    with torch.no_grad():
        for p in plain.module.parameters():
            p -= 0.5 * p.grad
    assert stats.steps == 1 and stats.num_examples == 12
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(model.get_flat(), plain.get_flat(), rtol=1e-5, atol=1e-6)
    assert _no_hooks(model.module)


@pytest.mark.parametrize(
    "cfg",
    [
        training.LocalTraining(lr=0.1, momentum=0.9, weight_decay=0.01, epochs=3, batch_size=64),
        training.LocalTraining(optimizer=training.LocalOptimizer.ADAM, lr=0.01, epochs=3),
    ],
)
def test_without_noise_or_clipping_the_optimizer_matches_plain_training(
    cfg: training.LocalTraining,
) -> None:
    model, x, y = _model("image_cnn")
    plain = TorchModel(copy.deepcopy(model.module))
    dp = dp_sgd.DPSGD(max_grad_norm=math.inf, noise_multiplier=0.0)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))
    plain_stats = training.train(plain, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert stats.steps == plain_stats.steps == 3
    assert stats.loss == pytest.approx(plain_stats.loss, rel=1e-5)
    # Adam divides by sqrt(v): on coordinates whose gradient is ~1e-8, float rounding of the
    # gradient moves the step by a small fraction of lr.
    atol = 1e-4 * cfg.lr if cfg.optimizer is training.LocalOptimizer.SGD else 1e-2 * cfg.lr
    torch.testing.assert_close(model.get_flat(), plain.get_flat(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", HOOKABLE)
def test_hook_norms_and_clipped_sum_match_torch_func(name: str) -> None:
    model, x, y = _model(name)
    reference = _reference_grads(model, x, y)
    true_norms = reference.norm(dim=1)
    clip = float(true_norms.median())  # about half the examples get clipped
    with per_example_grads.per_example_clipper(
        model, per_example_grads.GradientMethod.HOOKS
    ) as clipper:
        batch = clipper(x, y, clip)

    torch.testing.assert_close(batch.norms, true_norms, rtol=1e-4, atol=1e-7)
    factors = torch.clamp(clip / (true_norms + 1e-6), max=1.0)
    torch.testing.assert_close(batch.factors, factors, rtol=1e-4, atol=1e-7)
    assert int((batch.factors < 1).sum()) >= 5
    assert float((batch.factors * batch.norms).max()) <= clip * (1 + 1e-5)
    expected = factors @ reference
    torch.testing.assert_close(_flat(batch.grads), expected, rtol=1e-4, atol=1e-5)
    assert _no_hooks(model.module)


@pytest.mark.parametrize("name", HOOKABLE)
def test_hooks_equal_the_vmap_fallback(name: str) -> None:
    model, x, y = _model(name, seed=1)
    with per_example_grads.per_example_clipper(
        model, per_example_grads.GradientMethod.HOOKS
    ) as clipper:
        fast = clipper(x, y, 0.5)
    with per_example_grads.per_example_clipper(
        model, per_example_grads.GradientMethod.VMAP
    ) as clipper:
        slow = clipper(x, y, 0.5)
    torch.testing.assert_close(fast.norms, slow.norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_flat(fast.grads), _flat(slow.grads), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.loss_sum, slow.loss_sum)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_training_on_hooks_equals_training_on_vmap(
    noise: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same generator state, same sampled batches and noise: the same trained model."""
    model, x, y = _model("image_cnn")
    slow = TorchModel(copy.deepcopy(model.module))
    cfg = training.LocalTraining(lr=0.1, momentum=0.9, batch_size=4, epochs=1, augment="image")
    dp = dp_sgd.DPSGD(max_grad_norm=0.5, noise_multiplier=noise)
    fast_stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(per_example_grads, "_hookable_layers", lambda model: None)
    slow_stats = dp_sgd.train(slow, x, y, cfg, dp, generator=torch.Generator().manual_seed(5))
    assert fast_stats.steps == slow_stats.steps == 3
    assert fast_stats.loss == pytest.approx(slow_stats.loss, rel=1e-4)
    torch.testing.assert_close(model.get_flat(), slow.get_flat(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
    ],
)
def test_unfold_equals_torch_unfold(conv: nn.Conv1d | nn.Conv2d) -> None:
    x = torch.randn(2, 9, 3, 11).transpose(1, 2)  # a non-contiguous [2, 3, 9, 11]
    if isinstance(conv, nn.Conv1d):
        x = x[:, :, 0]
        k, d, p, s = (
            (1, *conv.kernel_size),
            (1, *conv.dilation),
            (0, *conv.padding),
            (1, *conv.stride),
        )
        expected = F.unfold(x.unsqueeze(2), k, dilation=d, padding=p, stride=s)
    else:
        expected = F.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        )
    assert torch.equal(per_example_grads._unfold(conv, x), expected)
    assert expected.shape[2] == conv(x).shape[-1] * (conv(x).shape[-2] if x.ndim == 4 else 1)


def test_dp_image_cnn_is_small_and_on_the_hook_path() -> None:
    """GroupNorm without affine weights owns no parameter: per-example gradients need no vmap."""
    model = TorchModel(torch_models.dp_image_cnn((1, 28, 28), 2))
    assert model.get_flat().numel() == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 32 * 5 * 5 * 2 + 2
    assert per_example_grads._hookable_layers(model) is not None  # every weight in a Conv or Linear


def test_group_norm_takes_the_fallback_and_trains() -> None:
    model, x, y = _model("group_norm")
    assert per_example_grads._hookable_layers(model) is None
    with pytest.raises(ValueError, match="outside Linear/Conv"):
        with per_example_grads.per_example_clipper(model, per_example_grads.GradientMethod.HOOKS):
            pass
    reference = _reference_grads(model, x, y)
    with per_example_grads.per_example_clipper(model) as clipper:
        batch = clipper(x, y, 1.0)
    torch.testing.assert_close(batch.norms, reference.norm(dim=1), rtol=1e-4, atol=1e-7)

    before = model.get_flat()
    cfg = training.LocalTraining(optimizer=training.LocalOptimizer.ADAM, lr=0.01, batch_size=6)
    dp = dp_sgd.DPSGD(max_grad_norm=1.0, noise_multiplier=0.5)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))
    assert stats.steps == 2 and math.isfinite(stats.loss)
    assert not torch.equal(model.get_flat(), before)


def test_layer_called_twice_falls_back_to_vmap() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    module = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(6, 2))
    model = TorchModel(module)
    x, y = _data((6,), 10, 2)
    with per_example_grads.per_example_clipper(
        model, per_example_grads.GradientMethod.HOOKS
    ) as clipper:
        with pytest.raises(ValueError, match="called 2 times"):
            clipper(x, y, 1.0)
    assert _no_hooks(module)
    with per_example_grads.per_example_clipper(model) as clipper:
        batch = clipper(x, y, 1.0)
    torch.testing.assert_close(batch.norms, _reference_grads(model, x, y).norm(dim=1))


def test_noise_has_the_dp_sgd_scale() -> None:
    dp = dp_sgd.DPSGD(max_grad_norm=2.0, noise_multiplier=0.7)
    q, n = dp_sgd.sampling_rate(1000, 50), 1000
    zeros = per_example_grads.ClippedBatch(
        [torch.zeros(300, 400), torch.zeros(1000)], torch.zeros(0), torch.zeros(0), torch.zeros(())
    )
    noised = dp_sgd.noisy_mean(zeros, dp.noise_std, q * n, torch.Generator().manual_seed(0))
    flat = _flat(noised)
    expected = 0.7 * 2.0 / 50
    assert float(flat.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(flat.mean())) < 0.01 * expected
    assert not zeros.grads[0].any()  # the clipped sums are left as they were
    # Same generator state, same noise.
    again = dp_sgd.noisy_mean(zeros, dp.noise_std, q * n, torch.Generator().manual_seed(0))
    assert torch.equal(_flat(again), flat)


def test_an_empty_batch_is_a_noise_only_step() -> None:
    model, _, _ = _model("logistic_regression")
    before = model.get_flat()
    cfg = training.LocalTraining(lr=1.0)
    optimizer = training._make_optimizer(cfg, [s.param for s in model.trainable()])
    dp = dp_sgd.DPSGD(max_grad_norm=1.0, noise_multiplier=2.0)
    with per_example_grads.per_example_clipper(model) as clipper:
        loss = dp_sgd.dp_step(
            clipper, model, optimizer, torch.zeros(0, 1, 6, 6), torch.zeros(0).long(), dp, 4.0,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
    step = before - model.get_flat()
    assert float(loss) == 0.0
    assert float(step.std()) == pytest.approx(2.0 * 1.0 / 4.0, rel=0.25)  # 111 coordinates


def test_poisson_batches_and_step_count(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_step = dp_sgd.dp_step

    def recording_step(clip, model, optimizer, xb, yb, dp, expected, generator):  # noqa: ANN001
        sizes.append(int(xb.shape[0]))
        assert expected == pytest.approx(100.0)
        return real_step(clip, model, optimizer, xb, yb, dp, expected, generator)

    monkeypatch.setattr(dp_sgd, "dp_step", recording_step)
    model, _, _ = _model("logistic_regression")
    x, y = _data((1, 6, 6), 1000, 3)
    cfg = training.LocalTraining(lr=0.05, batch_size=100, epochs=3)
    dp = dp_sgd.DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))
    assert stats.steps == len(sizes) == 3 * 10
    # Binomial(1000, 0.1) batches: the mean of 30 has a standard deviation of 1.7 %.
    assert sum(sizes) / len(sizes) == pytest.approx(100.0, rel=0.05)
    assert len(set(sizes)) > 5  # Poisson, not fixed-size batches

    capped = training.LocalTraining(lr=0.05, batch_size=100, epochs=3, max_steps=7)
    stats = dp_sgd.train(model, x, y, capped, dp, generator=torch.Generator().manual_seed(0))
    assert stats.steps == 7 and stats.num_examples == 1000


def test_sampling_schedule() -> None:
    assert dp_sgd.sampling_rate(1000, 32) == 0.032
    assert dp_sgd.sampling_rate(10, 32) == 1.0
    assert dp_sgd.steps_per_epoch(1000, 32) == 31
    assert dp_sgd.steps_per_epoch(10, 32) == 1
    g = torch.Generator().manual_seed(0)
    sizes = [dp_sgd.poisson_sample(100, 0.1, g).numel() for _ in range(2000)]
    assert sum(sizes) / len(sizes) == pytest.approx(10.0, rel=0.03)
    assert dp_sgd.poisson_sample(7, 1.0, g).tolist() == list(range(7))


def test_batch_norm_is_refused_by_name() -> None:
    features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    module = nn.Sequential()
    module.add_module("features", features)
    module.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(8 * 10 * 10, 2)))
    model = TorchModel(module)
    with pytest.raises(
        ValueError, match=r"features\.1 \(BatchNorm2d\).*GroupNorm\(num_groups, 8\)"
    ):
        dp_sgd.check_compatible(model)
    x, y = _data((1, 12, 12), 8, 2)
    cfg = training.LocalTraining()
    with pytest.raises(ValueError, match="GroupNorm"):
        dp_sgd.train(model, x, y, cfg, dp_sgd.DPSGD(1.0, 1.0), generator=torch.Generator())
    running = TorchModel(nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True)))
    with pytest.raises(ValueError, match=r"0 \(InstanceNorm1d\)"):
        dp_sgd.check_compatible(running)
    dp_sgd.check_compatible(TorchModel(_group_norm_cnn()))


def test_keras_model_is_refused() -> None:
    from fedguard.models import keras_models
    from fedguard.models.keras_adapter import KerasModel

    model = KerasModel(keras_models.logistic_regression((4,), 3))
    with pytest.raises(ValueError, match=r"PyTorch.*privacy\.mode = \"central\""):
        dp_sgd.check_compatible(model)
    with pytest.raises(ValueError, match="PyTorch"):
        dp_sgd.check_compatible(TorchModel(model.module))


def test_unsupported_settings_are_refused() -> None:
    model, x, y = _model("logistic_regression")
    dp = dp_sgd.DPSGD(1.0, 1.0)
    g = torch.Generator()
    for cfg in (
        training.LocalTraining(optimizer=training.LocalOptimizer.LBFGS),
        training.LocalTraining(optimizer=training.LocalOptimizer.NEWTON),
    ):
        with pytest.raises(ValueError, match='"sgd" or "adam"'):
            dp_sgd.train(model, x, y, cfg, dp, generator=g)
    with pytest.raises(ValueError, match="proximal_mu"):
        dp_sgd.train(model, x, y, training.LocalTraining(proximal_mu=0.1), dp, generator=g)
    with pytest.raises(ValueError, match="positive"):
        dp_sgd.DPSGD(0.0, 1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        dp_sgd.DPSGD(1.0, -1.0)
    with pytest.raises(ValueError, match="finite clipping norm"):
        dp_sgd.DPSGD(math.inf, 1.0)


def test_hooks_are_removed_when_training_fails() -> None:
    model, x, _ = _model("image_cnn")
    bad_labels = torch.full((len(x),), 7)  # out of range for 2 classes
    cfg = training.LocalTraining(batch_size=len(x))
    with pytest.raises((IndexError, RuntimeError)):
        dp_sgd.train(model, x, bad_labels, cfg, dp_sgd.DPSGD(1.0, 0.0), generator=torch.Generator())
    assert _no_hooks(model.module)


def test_private_training_learns_a_separable_problem() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 1, 4, 4, generator=g)
    x[:, 0, 0, 0] += 3.0 * (2 * y - 1)  # one feature separates the classes
    torch.manual_seed(0)
    model = TorchModel(torch_models.logistic_regression((1, 4, 4), 2))

    def loss() -> float:
        with torch.no_grad():
            return float(F.nll_loss(model.log_probabilities(x, training=False), y))

    before = loss()
    cfg = training.LocalTraining(lr=0.5, momentum=0.5, batch_size=40, epochs=5)
    dp = dp_sgd.DPSGD(max_grad_norm=1.0, noise_multiplier=0.5)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=g)
    with torch.no_grad():
        accuracy = float((model.forward(x, training=False).argmax(-1) == y).float().mean())
    assert stats.steps == 50
    assert loss() < 0.3 * before and loss() < 0.2
    assert accuracy > 0.95


# --- against an independent reference, with C != 1 ----------------------------------------------

# A clip bound and a noise multiplier far from 1, so that sigma, C and sigma * C all differ.
REF_CLIP, REF_SIGMA = 0.37, 1.7


def _naive_clipped_sum(module: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    """The textbook loop: one backward per example, each gradient (all parameters jointly)
    scaled by ``min(1, clip / (norm + 1e-6))``, then summed. Returns the sums keyed by
    parameter name and how many examples were clipped."""
    params = dict(module.named_parameters())
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    clipped = 0
    for i in range(len(y)):
        logits = module(x[i : i + 1])
        loss = F.nll_loss(torch.log_softmax(logits, -1), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        factor = min(1.0, clip / (norm + 1e-6))
        clipped += factor < 1.0
        for name, g in zip(params, grads, strict=True):
            total[name] += factor * g.double()
    return total, clipped


@pytest.mark.parametrize("name", ["logistic_regression", "image_cnn", "tokens_mlp", "group_norm"])
def test_a_noiseless_step_is_the_naive_clipped_mean(name: str) -> None:
    """One step of ``train`` with q = 1 and no noise: params move by lr * (sum of per-example
    gradients, each clipped to C = 0.37) / n. Hooks (the first three) and vmap (group norm)."""
    model, x, y = _model(name)
    reference = copy.deepcopy(model.module)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    sums, clipped = _naive_clipped_sum(reference, x, y, REF_CLIP)
    assert clipped >= len(y) // 2  # the clip binds: an unclipped step would differ

    lr, n = 0.5, len(y)
    cfg = training.LocalTraining(lr=lr, batch_size=n)  # q = 1: one step on all 12 examples
    dp = dp_sgd.DPSGD(max_grad_norm=REF_CLIP, noise_multiplier=0.0)
    stats = dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))
    assert stats.steps == 1
    for pname, p in model.module.named_parameters():
        step = (before[pname] - p.detach()).double()
        # float32 per-example gradients against float64 sums of them: 1e-5 relative, 1e-7 abs
        torch.testing.assert_close(step, lr * sums[pname] / n, rtol=1e-5, atol=1e-7)


def test_a_step_divides_by_the_expected_batch_size_not_the_drawn_one() -> None:
    """DP-SGD with Poisson sampling normalises by q n (fixed), never by the batch it drew."""
    model, x, y = _model("logistic_regression")
    reference = copy.deepcopy(model.module)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    sums, _ = _naive_clipped_sum(reference, x, y, REF_CLIP)
    optimizer = torch.optim.SGD([s.param for s in model.trainable()], lr=1.0)
    dp = dp_sgd.DPSGD(max_grad_norm=REF_CLIP, noise_multiplier=0.0)
    with per_example_grads.per_example_clipper(model) as clip:
        dp_sgd.dp_step(clip, model, optimizer, x, y, dp, 30.0, torch.Generator().manual_seed(0))
    for pname, p in model.module.named_parameters():
        step = (before[pname] - p.detach()).double()
        torch.testing.assert_close(step, sums[pname] / 30.0, rtol=1e-5, atol=1e-7)


def test_the_injected_noise_has_std_sigma_c_over_the_expected_batch() -> None:
    """Two one-step runs from the same model and generator state, with and without noise: the
    difference is the noise alone, N(0, (sigma C / (q n))^2) on each of the 7,850 coordinates."""
    torch.manual_seed(0)
    module = torch_models.logistic_regression((1, 28, 28), 10)
    x, y = _data((1, 28, 28), 12, 10)
    cfg = training.LocalTraining(lr=1.0, batch_size=12)  # q = 1, q n = 12, one step

    def one_step(noise: float) -> torch.Tensor:
        model = TorchModel(copy.deepcopy(module))
        dp = dp_sgd.DPSGD(max_grad_norm=REF_CLIP, noise_multiplier=noise)
        dp_sgd.train(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(3))
        return model.get_flat().double()

    clean, noisy = one_step(0.0), one_step(REF_SIGMA)
    noise = clean - noisy  # lr = 1: the step's noise term, (sigma C z) / (q n)
    assert noise.numel() == 7850
    expected = REF_SIGMA * REF_CLIP / 12  # 0.0524; sigma alone would give 0.142, C alone 0.031
    # The sample std of 7,850 normal draws is within 0.8 % (one standard error) of the truth.
    assert float(noise.std()) == pytest.approx(expected, rel=0.04)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())
