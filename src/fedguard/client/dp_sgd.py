"""Record-level differential privacy inside a client: DP-SGD (Abadi et al. 2016).

Each step of :func:`train`

1. Poisson-samples the batch: each of the ``n`` local examples joins independently with
   probability ``q = min(1, batch_size / n)`` (an empty batch is still a step);
2. clips the gradient ``g_i`` of each example's NLL, over all trainable parameters jointly, to
   ``g_i * min(1, C / (||g_i|| + 1e-6))``;
3. sets ``grad = (sum_i clipped g_i + N(0, (sigma C)^2 I)) / (q n)`` (the expected batch size, as
   Opacus does for Poisson sampling) and lets the configured optimizer (SGD or Adam) step.

So a client's training is ``steps`` compositions of ``PoissonSampledDpEvent(q,
GaussianDpEvent(sigma))`` over its own records, which is what the accountant composes.

Per-example gradients come from :mod:`fedguard.client.per_example_grads` (layer hooks with
ghost norms where the model allows, ``torch.func.vmap`` otherwise).

Each per-example quantity depends on one example only, so the update is private whatever the
model computes, provided no layer mixes the examples of a batch: :func:`check_compatible` refuses
batch norm for that reason (and its running statistics, which leave the client without noise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedguard.client import training
from fedguard.client.per_example_grads import (
    ClipFn,
    ClippedBatch,
    per_example_clipper,
)
from fedguard.data import augment
from fedguard.models.adapter import ModelAdapter, TorchModel


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings: per-example clip bound ``C`` and noise multiplier ``sigma``.

    The noise on the sum of clipped gradients has standard deviation ``sigma * C`` per
    coordinate. ``max_grad_norm = math.inf`` turns clipping off (only without noise).
    """

    max_grad_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.max_grad_norm > 0.0:
            raise ValueError(f"The clipping norm must be positive, got {self.max_grad_norm}.")
        if not (self.noise_multiplier >= 0.0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"The noise multiplier must be finite and >= 0, got {self.noise_multiplier}."
            )
        if self.noise_multiplier > 0.0 and math.isinf(self.max_grad_norm):
            raise ValueError("Noise needs a finite clipping norm, got max_grad_norm = inf.")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the summed clipped gradients: ``sigma * C``."""
        return self.noise_multiplier * self.max_grad_norm if self.noise_multiplier > 0 else 0.0


@dataclass(frozen=True)
class DPTrainStats(training.TrainStats):
    """What :func:`train` ran: ``steps`` Poisson-sampled steps at rate ``sampling_rate``, each
    clipping per-example gradients to ``max_grad_norm`` and adding noise at
    ``noise_multiplier`` (a client reports these so that the server composes them)."""

    sampling_rate: float
    noise_multiplier: float
    max_grad_norm: float


# --- Checks and schedule -------------------------------------------------------------------


def check_compatible(model: ModelAdapter) -> None:
    """Raise ValueError before any training if DP-SGD cannot run on this model."""
    if not isinstance(model, TorchModel) or _is_keras(model.module):
        raise ValueError(
            f"DP-SGD needs a PyTorch module (per-example gradients come from torch hooks and "
            f"torch.func), got a {type(model).__name__}: build the model as a torch.nn.Module, "
            f'or use privacy.mode = "central", which works for Keras models too.'
        )
    for name, module in model.module.named_modules():
        problem = _mixing_problem(module)
        if problem is not None:
            raise ValueError(
                f"DP-SGD cannot train layer {name or '<root>'} ({type(module).__name__}): "
                f"{problem}. Replace it with GroupNorm, e.g. torch.nn.GroupNorm(num_groups, "
                f"{getattr(module, 'num_features', 'channels')})."
            )
    if not model.trainable():
        raise ValueError("DP-SGD needs a model with trainable parameters, this one has none.")


def _is_keras(module: nn.Module) -> bool:
    return any(c.__module__.startswith("keras") for c in type(module).__mro__)


def _mixing_problem(module: nn.Module) -> str | None:
    """Why a normalisation layer breaks per-example privacy, or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            "batch norm mixes the examples of a batch, so per-example gradients are not "
            "defined, and its running statistics leave the client without noise"
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return "its running statistics are averages over the batch that leave the client unnoised"
    return None


def _check_training(cfg: training.LocalTraining) -> None:
    if cfg.optimizer not in (training.LocalOptimizer.SGD, training.LocalOptimizer.ADAM):
        raise ValueError(
            f'DP-SGD supports optimizer "sgd" or "adam", got "{cfg.optimizer}" '
            "(full-batch methods see every record at every step)."
        )
    if cfg.proximal_mu > 0.0:
        raise ValueError(f"DP-SGD does not support proximal_mu > 0, got {cfg.proximal_mu}.")


def sampling_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = min(1, batch_size / n)``."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"Sampling needs n >= 1 and batch_size >= 1, got {n} and {batch_size}.")
    return min(1.0, batch_size / n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps that make one epoch in expectation: ``max(1, round(n / batch_size))``."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"Sampling needs n >= 1 and batch_size >= 1, got {n} and {batch_size}.")
    return max(1, round(n / batch_size))


def num_steps(n: int, cfg: training.LocalTraining) -> int:
    """Optimizer steps :func:`train` takes: epochs times steps per epoch, capped at max_steps."""
    steps = cfg.epochs * steps_per_epoch(n, cfg.batch_size)
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def poisson_sample(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the examples that join this step's batch, each independently with prob ``q``."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1)


def batch_stream(
    x: torch.Tensor, y: torch.Tensor, cfg: training.LocalTraining, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The Poisson-sampled batches ``(x_b, y_b)`` of :func:`train`, one per step
    (:func:`num_steps` of them, empty ones included), augmented with ``generator`` when
    ``cfg.augment`` says so. Each draw happens when its batch is taken: a caller that draws the
    step's noise from the same generator before taking the next batch (as :func:`dp_step` does)
    repeats :func:`train`'s draws exactly."""
    n = int(y.shape[0])
    q = sampling_rate(n, cfg.batch_size)
    augment_fn = augment.get(cfg.augment)
    for _ in range(num_steps(n, cfg)):
        idx = poisson_sample(n, q, generator)
        xb = x[idx]
        if augment_fn is not None and idx.numel() > 0:
            xb = augment_fn(xb, generator)
        yield xb, y[idx]


# --- Training ------------------------------------------------------------------------------


def train(
    model: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: training.LocalTraining,
    dp: DPSGD,
    *,
    generator: torch.Generator,
    gradient_canaries: torch.Tensor | None = None,
) -> DPTrainStats:
    """Train in place with DP-SGD; returns what ran: ``steps`` = optimizer steps taken at sampling
    rate ``sampling_rate`` with ``dp``'s noise and clip (what the accountant composes).

    ``loss`` is the mean over non-empty batches of the batch-mean NLL (NaN if every batch was
    empty); it is reported as is, without privacy.

    ``gradient_canaries`` (a privacy audit's white-box canaries; see
    :mod:`fedguard.audit.canary`): flat coordinates of the model's parameters, one per canary
    record this client holds. Each step, each canary joins the batch with the examples' rate
    ``q`` (a coin from ``generator`` after the batch's draws) and contributes the gradient
    ``C e_c`` (norm ``C``: clipping leaves it as it is) to the clipped sum before the noise, so
    each canary is a record that DP-SGD protects exactly as it protects an example.
    """
    _check_training(cfg)
    check_compatible(model)
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("This client holds no training examples.")
    q = sampling_rate(n, cfg.batch_size)
    model.train_mode(True)
    optimizer = training._make_optimizer(cfg, [s.param for s in model.trainable()])
    total, non_empty = torch.zeros(()), 0
    taken = 0
    with per_example_clipper(model) as clip:
        if gradient_canaries is not None and gradient_canaries.numel() > 0:
            clip = with_gradient_canaries(
                clip, canary_positions(model, gradient_canaries), q, generator
            )
        for xb, yb in batch_stream(x, y, cfg, generator):
            loss_sum = dp_step(clip, model, optimizer, xb, yb, dp, q * n, generator)
            taken += 1
            if yb.numel() > 0:
                total += loss_sum / yb.numel()
                non_empty += 1
    loss = float(total) / non_empty if non_empty else math.nan
    return DPTrainStats(loss, taken, n, q, dp.noise_multiplier, dp.max_grad_norm)


def dp_step(
    clip: ClipFn,
    model: ModelAdapter,
    optimizer: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    dp: DPSGD,
    expected_batch_size: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One DP-SGD step on a sampled batch; returns the batch's (non-private) loss sum."""
    batch = clip(xb, yb, dp.max_grad_norm)
    grads = noisy_mean(batch, dp.noise_std, expected_batch_size, generator)
    for s, g in zip(model.trainable(), grads, strict=True):
        s.param.grad = g
    optimizer.step()
    return batch.loss_sum


def canary_positions(
    model: ModelAdapter, coordinates: torch.Tensor
) -> list[tuple[int, torch.Tensor]]:
    """Where flat ``coordinates`` of ``model`` fall among its trainable parameters: for each
    canary, ``(index into model.trainable(), position in that parameter's flattened tensor)``;
    a coordinate outside every trainable parameter is an error (it would add nothing)."""
    out: list[tuple[int, torch.Tensor]] = []
    for c in coordinates.tolist():
        for j, piece in enumerate(model.trainable()):
            if piece.offset <= c < piece.offset + piece.numel:
                out.append((j, torch.tensor(c - piece.offset)))
                break
        else:
            raise ValueError(f"Canary coordinate {c} is not in a trainable parameter.")
    return out


def with_gradient_canaries(
    clip: ClipFn, canaries: list[tuple[int, torch.Tensor]], q: float, generator: torch.Generator
) -> ClipFn:
    """``clip`` whose clipped sum also holds the gradient canaries at ``canaries``
    (:func:`canary_positions`) that this step samples, each with probability ``q`` (one coin
    per canary from ``generator``, after the batch's draws and before the noise's): a canary's
    clipped gradient is the clip bound times its coordinate vector."""

    def clip_with_canaries(xb: torch.Tensor, yb: torch.Tensor, bound: float) -> ClippedBatch:
        batch = clip(xb, yb, bound)
        joined = torch.rand(len(canaries), generator=generator) < q
        add_gradient_canaries(batch.grads, canaries, joined, bound)
        return batch

    return clip_with_canaries


def add_gradient_canaries(
    sums: list[torch.Tensor],
    canaries: list[tuple[int, torch.Tensor]],
    joined: torch.Tensor,
    value: float,
) -> None:
    """Add ``value`` at each ``joined`` canary's position of the per-parameter gradient sums
    (in place): the clipped gradient ``value e_c`` of a canary record that this step sampled."""
    for (j, position), taken in zip(canaries, joined.tolist(), strict=True):
        if taken:
            sums[j].view(-1)[position] += value


def noisy_mean(
    batch: ClippedBatch, std: float, expected_batch_size: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """``(sum of clipped gradients + N(0, std^2 I)) / expected_batch_size``, per parameter.

    The noise is one draw of all coordinates from ``generator`` (on the CPU, so that a seed gives
    the same noise on every device), in the order of ``batch.grads``.
    """
    sums = batch.grads
    if std <= 0.0:
        return [s / expected_batch_size for s in sums]
    noise = draw_noise(sum(s.numel() for s in sums), sums[0].dtype, generator)
    noise = noise.to(sums[0].device).split([s.numel() for s in sums])
    return [
        torch.add(s, z.view_as(s), alpha=std).div_(expected_batch_size)
        for s, z in zip(sums, noise, strict=True)
    ]


def draw_noise(numel: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """One step's standard normal noise, ``numel`` values in the order of the trainable
    parameters, drawn on the CPU from the client's ``generator`` (so that a seed gives the same
    noise on every device and in every engine)."""
    return torch.randn(numel, generator=generator, dtype=dtype)
