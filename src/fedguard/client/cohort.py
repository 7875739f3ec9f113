"""Local training of many clients at once: ``torch.func`` over stacked parameters.

The cohort engine (:mod:`fedguard.simulation.cohort`) hands this module the fit tasks of a round
that share their settings. Each client keeps its own copy of the parameters, one row of a
``[K, *shape]`` stack per tensor, and each step runs ``vmap(grad(loss))`` over the stack and the
clients' batches stacked to ``[K, B, ...]`` (``functional_call`` swaps a row's parameters into the
one model). The semantics are those of the sequential loops, step for step:

* batches come from the same per-client code and generator (:func:`fedguard.client.training.batch_stream`,
  :func:`fedguard.client.dp_sgd.batch_stream`), one batch per client per step, so each client's
  data order, batch sizes, augmentation and DP-SGD sampling are the ones it would draw alone;
* a batch smaller than the largest of the step (a client's last batch, a Poisson batch) is
  padded and its padding masked out of the loss; a client whose batches ran out takes no more
  steps (its parameters and optimizer state stay as they are: see
  :mod:`fedguard.algorithms.optimizers.stacked`); nobody is dropped;
* FedProx adds ``mu (w - w_global)``, SCAFFOLD ``c - c_i`` and FedDyn ``alpha (w - w_global) - g_k``
  to each client's gradient, then the same SGD or Adam arithmetic steps;
* DP-SGD takes per-example gradients with a second ``vmap`` inside the first, clips each to
  ``C`` (:func:`fedguard.client.per_example_grads.clip_factors`), sums them and adds noise drawn
  from each client's own generator right after its batch, as :func:`fedguard.client.dp_sgd.train`
  draws it.

Results therefore equal the sequential engine's up to float rounding (different batching of the
same sums), except for layers that draw randomness from torch's global generator (dropout):
``vmap`` draws their masks differently, so such a model trains with the same distribution but
not the same draws. What cannot be vectorised is reported by :func:`unsupported_model` and
:func:`unsupported_task`; the engine trains those clients sequentially.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedguard.algorithms.optimizers import stacked
from fedguard.client import dp_sgd, per_example_grads, trainers, training
from fedguard.client.app import Pretrained
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer, TrainTask
from fedguard.models.adapter import ModelAdapter, TorchModel
from fedguard.protocol import features

Params = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Member:
    """One client of a cohort: its trainer (a built-in loop), training task and data."""

    trainer: ClientTrainer
    task: TrainTask
    data: ClientData


def unsupported_model(model: ModelAdapter) -> str | None:
    """Why the cohort engine cannot train ``model`` (None: it can)."""
    if not isinstance(model, TorchModel) or dp_sgd._is_keras(model.module):
        return (
            f"a {type(model).__name__} (Keras layers do not take stacked parameters through "
            "torch.func)"
        )
    for name, module in model.module.named_modules():
        running = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        )
        if running:
            return (
                f"layer {name or '<root>'} ({type(module).__name__}) updates running statistics "
                "in training, which would be one buffer shared by the whole cohort"
            )
    if not model.trainable():
        return "the model has no trainable parameters"
    return None


def unsupported_task(trainer: ClientTrainer, cfg: training.LocalTraining) -> str | None:
    """Why the cohort engine cannot run ``trainer`` with ``cfg`` (None: it can)."""
    if type(trainer) not in (trainers.OptimizerTrainer, trainers.DPSGDTrainer):
        return f"the client trainer {type(trainer).__name__} is not one of the built-in loops"
    if cfg.optimizer not in (training.LocalOptimizer.SGD, training.LocalOptimizer.ADAM):
        return f'optimizer "{cfg.optimizer}" is not a minibatch method'
    if isinstance(trainer, trainers.DPSGDTrainer) and cfg.proximal_mu > 0:
        return "DP-SGD refuses a proximal term"
    return None


def _is_dp(trainer: ClientTrainer) -> bool:
    return isinstance(trainer, trainers.DPSGDTrainer)


def settings(member: Member) -> tuple[object, ...]:
    """What clients trained together must share: the loop, its settings, DP-SGD's clip and
    noise, and whether SCAFFOLD or FedDyn corrects the gradients."""
    config = member.task.config
    dp = trainers.dp_settings(config) if _is_dp(member.trainer) else None
    asked = features.asked(config, member.task.tensors)
    corrected = (features.CONTROL_VARIATE in asked, features.DYNAMIC_REGULARIZER in asked)
    return (type(member.trainer), trainers.local_training_from(config), dp, corrected)


class _Functional:
    """``model``'s log-probabilities as a function of its trainable parameters."""

    def __init__(self, model: TorchModel) -> None:
        self.wrapper = per_example_grads.LogProbs(model)
        names = {id(p): name for name, p in self.wrapper.named_parameters()}
        self.names = [names[id(s.param)] for s in model.trainable()]

    def log_probs(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            self.wrapper, dict(zip(self.names, params, strict=True)), (x,)
        )

    def batch_loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean NLL over the real (``mask`` 1) rows of one client's padded batch."""
        nll = F.nll_loss(self.log_probs(params, x), y, reduction="none")
        return (nll * mask).sum() / mask.sum().clamp(min=1.0)

    def example_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """NLL of one example (no batch dimension)."""
        return F.nll_loss(self.log_probs(params, x.unsqueeze(0)), y.unsqueeze(0), reduction="sum")


def train(model: TorchModel, members: Sequence[Member]) -> list[Pretrained]:
    """Train ``members`` together; one :class:`~fedguard.client.app.Pretrained` per member, in
    order.

    The members share :func:`settings` and their global parameters; ``model`` (on the device
    the cohort trains on) is loaded with those, so that tensors it does not train (buffers)
    hold the members' values. Results, noise and batches stay on the CPU like the sequential
    loop's; only the stacked training runs on the model's device. A finished client is left
    out of the remaining steps' computation; members of similar sizes finish together, so the
    engine passes them sorted by size.
    """
    if not members:
        return []
    first = members[0]
    cfg = trainers.local_training_from(first.task.config)
    dp = trainers.dp_settings(first.task.config) if _is_dp(first.trainer) else None
    if dp is not None:
        dp_sgd._check_training(cfg)
    for m in members:
        if int(m.data.train_y.shape[0]) == 0:
            raise ValueError(f"Client {m.task.client_id} holds no training examples.")
    model.set_flat(first.task.params)
    model.train_mode(True)
    run = _Run(model, members, cfg, dp)
    with per_example_grads.kept_parameters(run.fn.wrapper):
        run.all_steps()
    return run.results()


class _Run:
    """The state of one cohort's training: stacked parameters, optimizer state, batch streams."""

    def __init__(
        self,
        model: TorchModel,
        members: Sequence[Member],
        cfg: training.LocalTraining,
        dp: dp_sgd.DPSGD | None,
    ) -> None:
        self.model, self.members, self.cfg, self.dp = model, members, cfg, dp
        self.fn = _Functional(model)
        self.slices = model.trainable()
        self.device = self.slices[0].param.device
        k = len(members)
        base = [s.param.detach() for s in self.slices]
        self.anchor = base
        self.params = [b.unsqueeze(0).repeat(k, *([1] * b.ndim)) for b in base]
        self.state = stacked.init(self.params, adam=cfg.optimizer is training.LocalOptimizer.ADAM)
        sizes = [int(m.data.train_y.shape[0]) for m in members]
        self.sizes = sizes
        if dp is None:
            self.steps = [training.num_steps(n, cfg) for n in sizes]
            self.streams: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] = [
                training.batch_stream(m.data.train_x, m.data.train_y, cfg, m.task.generator)
                for m in members
            ]
        else:
            self.steps = [dp_sgd.num_steps(n, cfg) for n in sizes]
            self.streams = [
                dp_sgd.batch_stream(m.data.train_x, m.data.train_y, cfg, m.task.generator)
                for m in members
            ]
            self.rates = [dp_sgd.sampling_rate(n, cfg.batch_size) for n in sizes]
        self.correction = self._corrections()
        self.loss_total = torch.zeros(k)
        self.non_empty = torch.zeros(k, dtype=torch.int64)
        self.batch_grad = torch.func.vmap(
            torch.func.grad_and_value(self.fn.batch_loss), randomness="different"
        )
        per_example = torch.func.vmap(
            torch.func.grad_and_value(self.fn.example_loss),
            in_dims=(None, 0, 0),
            randomness="different",
        )
        self.example_grads = torch.func.vmap(per_example, randomness="different")

    def _corrections(self) -> list[torch.Tensor] | None:
        """SCAFFOLD's ``c - c_i`` or FedDyn's ``-g_k`` per client, stacked per parameter (None
        without either)."""
        terms = [trainers.gradient_correction(m.task) for m in self.members]
        if terms[0] is None:
            return None
        flat = torch.stack([t for t in terms if t is not None]).to(self.device)
        return [
            flat[:, s.offset : s.offset + s.numel].view(-1, *s.param.shape).to(s.param.dtype)
            for s in self.slices
        ]

    def all_steps(self) -> None:
        for t in range(max(self.steps)):
            active = [i for i, steps in enumerate(self.steps) if steps > t]
            self.step(active)

    def step(self, active: list[int]) -> None:
        """One optimizer step of the clients ``active`` (indices into the members)."""
        batches = [next(self.streams[i]) for i in active]
        x, y, mask = self._stack(batches)
        rows = torch.tensor(active, device=self.device)
        everyone = len(active) == len(self.members)  # the common case: no gather, no scatter
        sub = (
            tuple(self.params) if everyone else tuple(p.index_select(0, rows) for p in self.params)
        )
        if self.dp is None:
            grads, losses = self.batch_grad(sub, x, y, mask)
            self.loss_total.index_add_(0, rows.cpu(), losses.detach().cpu().to(torch.float32))
        else:
            grads = self._dp_grads(
                self.dp, active, sub, x, y, mask, [int(b[1].shape[0]) for b in batches]
            )
        grads = list(grads)
        if self.cfg.proximal_mu > 0:
            grads = [
                g + self.cfg.proximal_mu * (p - a)
                for g, p, a in zip(grads, sub, self.anchor, strict=True)
            ]
        if self.correction is not None:
            grads = [
                g + (c if everyone else c.index_select(0, rows))
                for g, c in zip(grads, self.correction, strict=True)
            ]
        full = (
            grads
            if everyone
            else [
                torch.zeros_like(p).index_copy_(0, rows, g)
                for p, g in zip(self.params, grads, strict=True)
            ]
        )
        on = torch.zeros(len(self.members), dtype=torch.bool)
        on[active] = True
        cfg = self.cfg
        if cfg.optimizer is training.LocalOptimizer.ADAM:
            self.state, self.params = stacked.adam(
                self.state, self.params, full, on, lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        else:
            self.state, self.params = stacked.sgd(
                self.state,
                self.params,
                full,
                on,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            )

    def _stack(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's batches padded to ``[A, B, ...]`` with a ``[A, B]`` mask of real rows."""
        counts = [int(yb.shape[0]) for _, yb in batches]
        width = max(max(counts), 1)
        dtype = self.slices[0].param.dtype
        if all(c == width for c in counts):
            x = torch.stack([xb for xb, _ in batches])
            y = torch.stack([yb for _, yb in batches])
            mask = torch.ones(len(batches), width, dtype=dtype)
        else:
            xb0, yb0 = batches[0]
            x = xb0.new_zeros((len(batches), width, *xb0.shape[1:]))
            y = yb0.new_zeros((len(batches), width))
            mask = torch.zeros(len(batches), width, dtype=dtype)
            for j, (xb, yb) in enumerate(batches):
                x[j, : counts[j]] = xb
                y[j, : counts[j]] = yb
                mask[j, : counts[j]] = 1.0
        return x.to(self.device), y.to(self.device), mask.to(self.device)

    def _dp_grads(
        self,
        dp: dp_sgd.DPSGD,
        active: list[int],
        sub: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        counts: list[int],
    ) -> list[torch.Tensor]:
        """DP-SGD's noisy mean gradient of each active client: per-example gradients, each
        clipped to ``C``, summed, plus ``N(0, (sigma C)^2)`` from the client's own generator,
        over the expected batch size ``q n`` (:func:`fedguard.client.dp_sgd.noisy_mean`)."""
        grads, losses = self.example_grads(sub, x, y)
        sq = torch.stack([g.flatten(2).square().sum(2) for g in grads]).sum(0)
        factors = per_example_grads.clip_factors(sq.sqrt(), dp.max_grad_norm) * mask
        a = len(active)
        sums = [torch.bmm(factors.unsqueeze(1), g.flatten(2)).view(a, *g.shape[2:]) for g in grads]
        loss_sums = (losses.detach() * mask).sum(1).cpu().to(torch.float32)
        sampled = torch.tensor(counts)
        took = torch.tensor(active)[sampled > 0]
        means = loss_sums[sampled > 0] / sampled[sampled > 0]
        self.loss_total.index_add_(0, took, means)
        self.non_empty.index_add_(0, took, torch.ones_like(took))
        expected = torch.tensor(
            [self.rates[i] * self.sizes[i] for i in active], dtype=torch.float64
        )
        std = dp.noise_std
        if std > 0.0:
            numel = sum(s.numel for s in self.slices)
            noise = torch.stack(
                [
                    dp_sgd.draw_noise(numel, sums[0].dtype, self.members[i].task.generator)
                    for i in active
                ]
            ).to(self.device)
            parts = noise.split([s.numel for s in self.slices], dim=1)
            sums = [torch.add(s, z.view_as(s), alpha=std) for s, z in zip(sums, parts, strict=True)]
        return [s / _rows(expected, s) for s in sums]

    def results(self) -> list[Pretrained]:
        """Each member's result, built by the same functions as the sequential trainers'."""
        out = []
        for i, m in enumerate(self.members):
            local = m.task.params.clone()
            for s, p in zip(self.slices, self.params, strict=True):
                local[s.offset : s.offset + s.numel] = p[i].detach().reshape(-1).to(local)
            update = local - m.task.params
            steps, n = self.steps[i], self.sizes[i]
            if self.dp is None:
                stats = training.TrainStats(float(self.loss_total[i]) / max(steps, 1), steps, n)
                result, state = trainers.optimizer_result(m.task, update, stats)
            else:
                count = int(self.non_empty[i])
                loss = float(self.loss_total[i]) / count if count else math.nan
                dp_stats = dp_sgd.DPTrainStats(
                    loss,
                    steps,
                    n,
                    self.rates[i],
                    self.dp.noise_multiplier,
                    self.dp.max_grad_norm,
                )
                result, state = trainers.dp_result(update, dp_stats), {}
            out.append(Pretrained(m.task.round, result, state))
        return out


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` ``[A]`` shaped to divide ``like`` ``[A, ...]`` row by row."""
    return values.to(like).view(-1, *([1] * (like.ndim - 1)))
