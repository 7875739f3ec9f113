"""Gradient inversion: what an honest-but-curious server reconstructs from a client's update.

The attack is Geiping et al. (NeurIPS 2020, "Inverting Gradients - How easy is it to break
privacy in federated learning?"): starting from random images, minimise

    1 - cos(grad_theta L(x_hat, y_hat), g) + tv_weight * TV(x_hat)

over ``x_hat`` with Adam on the signed gradient, kept inside the data's value range, where
``g`` is minus the update the server observes (local training moves against the gradient) and
``theta`` the round's starting parameters. The cosine ignores the update's scale (learning rate,
steps); several local steps make ``g`` an approximation the attack still matches (the paper's
multi-step setting). Labels come from the last layer as in iDLG (Zhao et al. 2020): the bias
of a softmax layer moves up for exactly the labels present, so the label of one record is the
bias entry that grew most; for several records the labels are dealt in proportion to the
entries that grew (a heuristic, exact for one record).

The observed update is re-created with the run's own client code (:mod:`fedguard.audit.replay`):
the round's fit task as the driver builds it (from the checkpoint the round started from, with
the run's strategy state and the client's seed) answered with the run's trainer, so DP-SGD's
clipping and noise and central DP's update clip are the run's. The attacked client holds
``batch_size`` of its records (the first of its partition) and trains ``local_steps``
full-batch steps on them: the worst case for the client (with DP-SGD its sampling rate is 1,
so the update is less protected than in the run, and the attack result is an upper bound on
what the server learns). Under secure aggregation the server observes only the sum of the
round's updates, re-created the same way (the masks cancel in the sum; the fixed-point
rounding and distributed DP's noise shares are left out, which again favours the attacker).

Scored with scikit-image: PSNR and SSIM of each reconstruction against the original it matches
best (an optimal assignment), on images scaled to [0, 1] by the data's range, beside the PSNR
of uniformly random images (the baseline an attacker gets without the update).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fedguard.algorithms.privacy import accounting
from fedguard.audit import canary
from fedguard.audit.replay import RoundReplay
from fedguard.audit.target import AuditedRun, AuditError
from fedguard.client.data import ClientData
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import messages

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE_DRAWS = 16  # random images per original for the baseline PSNR
MAX_PICTURES = 16  # columns of the PNG grid


@dataclass(frozen=True)
class InversionSettings:
    """The attacked round (1: the initial model), client (None: the lowest id sampled in that
    round), the client's records and local steps, and the attack's optimisation: ``iterations``
    Adam steps at ``lr``, ``tv_weight`` on the total variation, ``restarts`` random starts (the
    best cosine is kept), ``seed`` of the starts."""

    round: int = 1
    client: int | None = None
    batch_size: int = 1
    local_steps: int = 1
    iterations: int = 1000
    lr: float = 0.1
    tv_weight: float = 1e-4
    restarts: int = 1
    seed: int = 0


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference of neighbouring pixels of images ``[B, C, H, W]``."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


def _named_params(model: ModelAdapter, flat: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """The trainable parameters' names and their values in the flat vector ``flat``."""
    names = {id(p): name for name, p in model.module.named_parameters()}
    slices = model.trainable()
    if any(id(s.param) not in names for s in slices):
        raise AuditError("Gradient inversion needs a PyTorch module (torch.nn.Module).")
    values = [flat[s.offset : s.offset + s.numel].view_as(s.param) for s in slices]
    return [names[id(s.param)] for s in slices], values


def recover_labels(
    model: ModelAdapter, update: torch.Tensor, count: int, num_classes: int
) -> torch.Tensor:
    """Labels of ``count`` records from the last layer's part of ``update`` (iDLG): the bias of
    the output layer (or, without one, the row sums of its weight) grows for the labels present;
    for one record the entry that grew most, for several records ``count`` labels dealt in
    proportion to the entries that grew (largest remainders)."""
    slices = model.trainable()
    last = next(
        (s for s in reversed(slices) if tuple(s.param.shape) == (num_classes,)),
        None,
    )
    if last is not None:
        signal = update[last.offset : last.offset + last.numel].double()
    else:
        weight = next(
            (s for s in reversed(slices) if s.param.dim() == 2 and s.param.shape[0] == num_classes),
            None,
        )
        if weight is None:
            raise AuditError("Gradient inversion found no output layer to recover labels from.")
        rows = update[weight.offset : weight.offset + weight.numel].view_as(weight.param)
        signal = rows.double().sum(dim=1)
    if count == 1:
        return signal.argmax().view(1)
    grew = signal.clamp_min(0.0)
    if not float(grew.sum()) > 0:
        grew = torch.ones_like(signal)
    share = grew / grew.sum() * count
    counts = share.floor().long()
    for c in torch.argsort(share - counts, descending=True)[: count - int(counts.sum())]:
        counts[c] += 1
    return torch.repeat_interleave(torch.arange(num_classes), counts)


def invert(
    model: ModelAdapter,
    params: torch.Tensor,
    update: torch.Tensor,
    labels: torch.Tensor,
    input_shape: tuple[int, ...],
    value_range: tuple[float, float],
    settings: InversionSettings,
) -> tuple[torch.Tensor, float]:
    """Geiping et al.'s reconstruction of ``len(labels)`` records from ``update`` observed at
    ``params``; returns the images and the gradient cosine they reach."""
    module = model.module
    model.train_mode(False)
    names, _ = _named_params(model, params)
    theta = [v.detach() for v in _named_params(model, params)[1]]
    target = [-v.detach().double() for v in _named_params(model, update)[1]]
    target_norm = torch.stack([(t * t).sum() for t in target]).sum().sqrt()
    low, high = value_range
    generator = torch.Generator().manual_seed(settings.seed)
    best_x, best_cos = None, -2.0
    for _ in range(settings.restarts):
        x = torch.rand((len(labels), *input_shape), generator=generator) * (high - low) + low
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.lr * (high - low))
        milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        params_dict = dict(zip(names, [t.requires_grad_(True) for t in theta], strict=True))
        cos = torch.zeros(())
        for _ in range(settings.iterations):
            optimizer.zero_grad()
            out = torch.func.functional_call(module, params_dict, (x,))
            logp = (
                torch.log(out.clamp_min(1e-12))
                if model.outputs_probabilities
                else out.log_softmax(-1)
            )
            loss = torch.nn.functional.nll_loss(logp, labels)
            grads = torch.autograd.grad(loss, list(params_dict.values()), create_graph=True)
            dot = torch.stack(
                [(g.double() * t).sum() for g, t in zip(grads, target, strict=True)]
            ).sum()
            norm = torch.stack([(g.double() * g.double()).sum() for g in grads]).sum().sqrt()
            cos = dot / (norm * target_norm).clamp_min(1e-30)
            objective = 1.0 - cos + settings.tv_weight * total_variation(x).double()
            (x_grad,) = torch.autograd.grad(objective, [x])
            x.grad = x_grad.sign()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(low, high)
        if float(cos.detach()) > best_cos:
            best_x, best_cos = x.detach().clone(), float(cos.detach())
    if best_x is None:
        raise ValueError("The attack needs at least one restart.")
    return best_x, best_cos


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """Images scaled to [0, 1] by the data's value range, as float64 numpy ``[B, C, H, W]``."""
    low, high = value_range
    return ((x.double() - low) / (high - low)).clamp(0, 1).numpy()


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image's SSIM of two ``[C, H, W]`` images in [0, 1] (the largest odd window that
    fits, at most 7)."""
    side = min(a.shape[1], a.shape[2])
    win = min(7, side if side % 2 else side - 1)
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], data_range=1.0, win_size=win))
    return float(structural_similarity(a, b, data_range=1.0, win_size=win, channel_axis=0))


def score(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    value_range: tuple[float, float],
    seed: int = 0,
    mean_image: torch.Tensor | None = None,
) -> dict[str, Any]:
    """PSNR and SSIM (scikit-image) of each reconstruction against the original it is assigned
    to (the assignment that maximises the total PSNR), their medians, the median PSNR of
    uniformly random images against the originals (``baseline_psnr``) and, given the
    population's ``mean_image``, its median PSNR against them (``mean_image_psnr``: the best
    guess without the update for data that sits in a narrow part of its range)."""
    a, b = _unit(originals, value_range), _unit(reconstructions, value_range)
    prior = None
    if mean_image is not None:
        m = _unit(mean_image[None], value_range)[0]
        prior = float(
            np.median([peak_signal_noise_ratio(a[i], m, data_range=1.0) for i in range(len(a))])
        )
    psnr = np.array(
        [
            [peak_signal_noise_ratio(a[i], b[j], data_range=1.0) for j in range(len(b))]
            for i in range(len(a))
        ]
    )
    rows, cols = linear_sum_assignment(-np.minimum(psnr, 100.0))
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    rng = np.random.default_rng(seed)
    baseline = [
        peak_signal_noise_ratio(a[i], rng.random(a[i].shape), data_range=1.0)
        for i in range(len(a))
        for _ in range(BASELINE_DRAWS)
    ]
    psnrs = [float(psnr[i, j]) for i, j in pairs]
    ssims = [_ssim(a[i], b[j]) for i, j in pairs]
    return {
        "psnr": float(np.median(psnrs)),
        "ssim": float(np.median(ssims)),
        "baseline_psnr": float(np.median(baseline)),
        "mean_image_psnr": prior,
        "psnr_each": psnrs,
        "ssim_each": ssims,
        "order": [j for _, j in pairs],
    }


def _grid(originals: np.ndarray, recon: np.ndarray, path: Path, title: str) -> None:
    """Originals (top row) over their reconstructions (bottom row), at most 16 columns; the rows
    are as tall as the records' aspect needs (a wide feature map, such as a spectrogram of 40
    bands by 101 frames, gets low rows instead of blank space)."""
    n = min(len(originals), MAX_PICTURES)
    width = max(1.2 * n + 0.6, 4.0)
    aspect = originals.shape[-2] / originals.shape[-1]  # a record's height over its width
    # inches: a square record is 1.2 tall, a wide one as tall as its aspect needs (at least 0.5)
    tall = max(min((width - 0.6) / n * aspect, 1.2), 0.5)
    labels = 10 if tall >= 0.9 else 7  # the rows' names fit beside a low row
    fig, axes = plt.subplots(2, n, figsize=(width, 0.8 + 2 * tall), squeeze=False)
    for k in range(n):
        for row, images in enumerate((originals, recon)):
            img = images[k]
            ax = axes[row][k]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.transpose(img[:3], (1, 2, 0)))
            ax.set_xticks([])
            ax.set_yticks([])
        if k == 0:
            axes[0][0].set_ylabel("original", fontsize=labels)
            axes[1][0].set_ylabel("attack", fontsize=labels)
    fig.suptitle(textwrap.fill(title, 60), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Observation:
    """What the server observes in the attacked round: ``update`` (the attacked client's, or
    under secure aggregation the round's sum), the round's starting ``params``, the fit-task
    ``config`` the clients trained with, and (for scoring) the ``attacked`` records of client
    ``client``; ``seen`` names what the attacker sees."""

    update: torch.Tensor
    params: torch.Tensor
    config: dict[str, messages.Scalar]
    attacked: ClientData
    client: int
    seen: str


def observed_update(run: AuditedRun, settings: InversionSettings) -> Observation:
    """Re-create what the server observes from the attacked client in ``settings.round`` with
    the run's client code (see the module docstring and :mod:`fedguard.audit.replay`)."""
    replay = RoundReplay.load(run, settings.round)
    cid = replay.client(settings.client)
    own = run.exp.fed.clients[cid]
    b = settings.batch_size
    if own.num_train < b:
        raise AuditError(f"{run.name}: client {cid} holds {own.num_train} records, fewer than {b}.")
    attacked = ClientData(own.train_x[:b], own.train_y[:b], own.eval_x, own.eval_y)
    steps = settings.local_steps
    local: dict[str, messages.Scalar] = {"batch_size": b, "epochs": steps, "max_steps": steps}
    update, seen = replay.observed(cid, replay.fit(cid, attacked, local))
    return Observation(update, replay.params, dict(replay.config), attacked, cid, seen)


def audit(run: AuditedRun, png: Path, settings: InversionSettings) -> dict[str, Any]:
    """The inversion row: PSNR/SSIM of the reconstructions, the random baseline, the setting,
    and the PNG grid of originals over reconstructions."""
    shape = tuple(run.exp.fed.input_shape)
    if len(shape) != 3:
        raise AuditError(
            f"{run.name}: gradient inversion reconstructs images [C, H, W]; the data's records "
            f"have shape {list(shape)}"
        )
    seen = observed_update(run, settings)
    update, params, attacked, cid = seen.update, seen.params, seen.attacked, seen.client
    xs = [d.train_x for d in run.exp.fed.clients.values()]
    value_range = (min(float(x.min()) for x in xs), max(float(x.max()) for x in xs))
    model = run.exp.model
    labels = recover_labels(model, update, settings.batch_size, run.exp.fed.num_classes)
    recon, cos = invert(model, params, update, labels, shape, value_range, settings)
    # user-level canary clients hold stand-in copies of one real record: not part of the prior
    plan = run.exp.canaries
    stand_ins = set(plan.clients) if plan is not None and plan.kind == canary.USER else set()
    others = [d.train_x for c, d in run.exp.fed.clients.items() if c != cid and c not in stand_ins]
    mean_image = torch.cat(others).mean(dim=0) if others else None
    scored = score(attacked.train_x, recon, value_range, seed=settings.seed, mean_image=mean_image)
    ordered = recon[torch.tensor(scored["order"])]
    _grid(
        _unit(attacked.train_x, value_range),
        _unit(ordered, value_range),
        png,
        f"client {cid}, round {settings.round}, batch {settings.batch_size}, "
        f"{settings.local_steps} step(s), {run.protection}: PSNR {scored['psnr']:.1f} dB",
    )
    true_labels = sorted(attacked.train_y.tolist())
    update_epsilon = None
    if messages.DP_SGD_NOISE in seen.config:  # the attacked update's own DP-SGD: full batches
        z = messages.config_float(seen.config, messages.DP_SGD_NOISE)
        mechanism = accounting.SampledGaussian(z, settings.local_steps, 1.0)
        update_epsilon = accounting.epsilon(mechanism, run.delta, accounting.Accountant.PLD)
    return {
        "attack": "inversion",
        "round": settings.round,
        "client": cid,
        "batch_size": settings.batch_size,
        "local_steps": settings.local_steps,
        "observed": seen.seen,
        "iterations": settings.iterations,
        "gradient_cosine": cos,
        "labels_recovered": sorted(labels.tolist()) == true_labels,
        "update_epsilon": update_epsilon,
        **{k: v for k, v in scored.items() if k != "order"},
    }
