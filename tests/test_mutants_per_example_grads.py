"""Per-example clipping on the models the engines must get right or refuse (found by mutation
testing): every result is checked against a naive loop of one backward pass per example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedguard.client.per_example_grads import (
    GradientMethod,
    _hookable_layers,
    _vmap_clipped_sum,
    clip_factors,
    per_example_clipper,
)
from fedguard.models.adapter import TorchModel

C = 2.5  # the clip bound of every test: some examples above it, some below


def _naive(model: TorchModel, x: torch.Tensor, y: torch.Tensor, max_norm: float):
    """Per example: the loss and its gradient over ``model.trainable()`` by one backward pass,
    its norm, ``min(1, C / (norm + 1e-6))`` and the clipped sum, flattened."""
    params = [s.param for s in model.trainable()]
    norms, losses, grads = [], [], []
    for i in range(x.shape[0]):
        log_probs = model.log_probabilities(x[i : i + 1], training=True)
        loss = F.nll_loss(log_probs, y[i : i + 1], reduction="sum")
        g = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                torch.zeros(p.numel()) if gi is None else gi.reshape(-1)
                for p, gi in zip(params, g, strict=True)
            ]
        )
        grads.append(flat)
        norms.append(flat.norm())
        losses.append(float(loss.detach()))
    norms_t = torch.stack(norms)
    factors = torch.clamp(max_norm / (norms_t + 1e-6), max=1.0)
    total = (factors[:, None] * torch.stack(grads)).sum(0)
    return norms_t, factors, total, sum(losses)


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * (1 + float(b.abs().max()))


def _check(model: TorchModel, x, y, method=GradientMethod.AUTO, max_norm=None, mixed=True):
    """The clipper's batch against the naive loop; the clip bound is by default the median
    per-example norm, so that about half the examples are clipped."""
    if max_norm is None:
        max_norm = float(_naive(model, x, y, 1.0)[0].median())
    norms, factors, total, loss = _naive(model, x, y, max_norm)
    with per_example_clipper(model, method) as clip:
        batch = clip(x, y, max_norm)
    assert _close(batch.norms, norms) and _close(batch.factors, factors)
    assert _close(_flat(batch.grads), total)
    assert float(batch.loss_sum) == pytest.approx(loss, rel=1e-5)
    assert [g.shape for g in batch.grads] == [s.param.shape for s in model.trainable()]
    if mixed:  # the clip bound matters here: some examples clipped, some not
        assert (factors < 1).any() and (factors == 1).any(), factors
    return batch


def _data(shape, n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _model(module: nn.Module, seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)  # unit-scale outputs
    return TorchModel(module)


def test_empty_and_one_example_batches_on_both_engines() -> None:
    model = _model(nn.Sequential(nn.Flatten(), nn.Linear(8, 3)))
    x, y = _data((8,))
    for method in (GradientMethod.HOOKS, GradientMethod.VMAP):
        with per_example_clipper(model, method) as clip:
            empty = clip(x[:0], y[:0], C)
        assert empty.norms.shape == (0,) and empty.factors.shape == (0,)
        assert empty.norms.dtype == empty.factors.dtype == torch.float32
        assert all(not g.any() for g in empty.grads) and float(empty.loss_sum) == 0.0
        assert [g.shape for g in empty.grads] == [(3, 8), (3,)]
        one = _check(model, x[:1], y[:1], method, max_norm=C, mixed=False)
        assert one.norms.shape == (1,) and float(one.factors[0]) < 1 and _flat(one.grads).any()
    # vmap: the factors are reported too
    norms, factors, total, _ = _naive(model, x, y, C)
    batch = _vmap_clipped_sum(model, x, y, C)
    assert _close(batch.factors, factors) and _close(batch.norms, norms)
    assert _close(batch.factors, clip_factors(batch.norms, C), 0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_vmap_takes_the_batch_size_from_the_first_dimension() -> None:
    """Examples without features (``x [4, 0]``, a model that is its bias) still form a batch of
    four: each gets the bias gradient, clipped where above C, as in the naive loop."""
    model = _model(nn.Linear(0, 3))
    x, y = torch.zeros(4, 0), torch.tensor([0, 2, 1, 2])
    norms, factors, total, loss = _naive(model, x, y, 0.5)
    batch = _vmap_clipped_sum(model, x, y, 0.5)
    assert batch.norms.shape == (4,) and _close(batch.norms, norms)
    assert _close(batch.factors, factors) and bool((factors < 1).any())
    assert _close(_flat(batch.grads), total) and float(total.abs().max()) > 0.1
    assert float(batch.loss_sum) == pytest.approx(loss, rel=1e-5)


class _Doubled(TorchModel):
    """An adapter whose training behaviour differs (logits doubled in training only): the
    clippers must ask for it."""

    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        out = self.module(x)
        return 2.0 * out if training else out


@pytest.mark.parametrize("method", [GradientMethod.HOOKS, GradientMethod.VMAP])
def test_losses_are_taken_in_training_behaviour(method) -> None:
    torch.manual_seed(0)
    model = _Doubled(nn.Sequential(nn.Linear(5, 3)))
    x, y = _data((5,))
    _check(model, x, y, method)


def test_after_a_fallback_the_clipper_keeps_to_vmap() -> None:
    shared = nn.Linear(4, 4)
    model = _model(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)))
    x, y = _data((4,))
    with per_example_clipper(model) as clip:
        first = clip(x, y, C)
        second = clip(x[:4], y[:4], 1.5)  # no hooks left: the vmap path
    norms, factors, total, loss = _naive(model, x[:4], y[:4], 1.5)
    assert _close(second.norms, norms) and _close(second.factors, factors)
    assert _close(_flat(second.grads), total)
    assert _close(first.norms, _naive(model, x, y, C)[0])


def test_hooks_explain_what_they_cannot_follow() -> None:
    shared = nn.Linear(4, 4)
    model = _model(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)))
    x, y = _data((4,))
    with per_example_clipper(model, GradientMethod.HOOKS) as clip:
        with pytest.raises(ValueError) as info:
            clip(x, y, C)
    assert str(info.value) == (
        "The hooks cannot follow this model: Linear was called 2 times in one forward pass."
    )

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    model = _model(Keyword())
    with per_example_clipper(model, GradientMethod.HOOKS) as clip:
        with pytest.raises(ValueError, match="Linear was called without a positional input"):
            clip(x, y, C)
    _check(model, x, y)  # auto: falls back to vmap


def test_outputs_changed_in_place_everywhere_are_copied() -> None:
    """Every hooked output is changed in place (LeakyReLU(inplace=True) after each layer): the
    hooks copy the outputs and still follow the model."""
    model = _model(
        nn.Sequential(
            nn.Linear(4, 5),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Linear(5, 3),
            nn.LeakyReLU(0.1, inplace=True),
        )
    )
    x, y = _data((4,))
    _check(model, x, y, GradientMethod.HOOKS)


class _Branch(nn.Module):
    """A layer whose output never reaches the loss, and a layer without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 2)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.fc(x)


def test_a_layer_the_loss_does_not_reach_gets_zero_gradients() -> None:
    model = _model(_Branch())
    x, y = _data((4,))
    batch = _check(model, x, y, GradientMethod.HOOKS)
    assert not batch.grads[0].any() and not batch.grads[1].any()  # unused.weight, unused.bias


def test_frozen_weights_or_biases_are_left_out_of_the_norm() -> None:
    x, y = _data((4,))
    frozen_weight = nn.Sequential(nn.Linear(4, 3))
    frozen_weight[0].weight.requires_grad_(False)
    model = _model(frozen_weight)
    assert [s.param.shape for s in model.trainable()] == [(3,)]
    _check(model, x, y, GradientMethod.HOOKS)
    frozen_bias = nn.Sequential(nn.Linear(4, 3))
    frozen_bias[0].bias.requires_grad_(False)
    _check(_model(frozen_bias), x, y, GradientMethod.HOOKS)


def test_convolutions_without_a_trainable_bias() -> None:
    # convolutions (the sequence book) without a trainable bias, on both norm formulas
    xc, yc = _data((2, 5, 5))
    small = nn.Sequential(nn.Conv2d(2, 16, 3, bias=False), nn.Flatten(), nn.Linear(16 * 9, 3))
    _check(_model(small), xc, yc, GradientMethod.HOOKS)  # T = 9: the ghost norm
    wide = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Flatten(), nn.Linear(50, 3))
    _check(_model(wide), xc, yc, GradientMethod.HOOKS)  # T = 25: explicit gradients
    frozen_conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 3))
    frozen_conv[0].weight.requires_grad_(False)
    _check(_model(frozen_conv), xc, yc, GradientMethod.HOOKS)


def test_grouped_convolutions_take_vmap() -> None:
    xc, yc = _data((2, 5, 5))
    grouped = _model(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 3)))
    assert _hookable_layers(grouped) is None
    _check(grouped, xc, yc)


def test_layer_subclasses_take_vmap() -> None:
    class Twice(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(2.0 * x)

    x, y = _data((4,))
    sub = _model(nn.Sequential(Twice(4, 3)))
    assert _hookable_layers(sub) is None
    _check(sub, x, y)


def test_tied_weights_take_vmap() -> None:
    x, y = _data((4,))
    first, second = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
    second.weight = first.weight  # one parameter in two layers
    tied = _model(nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)))
    assert _hookable_layers(tied) is None
    _check(tied, x, y)


def test_vmap_draws_different_dropout_masks_per_example() -> None:
    torch.manual_seed(0)
    model = TorchModel(
        nn.Sequential(nn.Linear(6, 6), nn.GroupNorm(2, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    )
    model.train_mode(True)
    x, y = _data((6,), n=8)
    assert _hookable_layers(model) is None
    with per_example_clipper(model) as clip:
        batch = clip(x, y, C)
    assert batch.norms.shape == (8,) and bool(torch.isfinite(batch.norms).all())
