"""Local training on one client: SGD, Adam, L-BFGS and the Newton statistics of convex models.

FedProx (Li et al. 2020) adds ``mu/2 ||w - w_global||^2`` to the local objective and SCAFFOLD adds
a fixed correction ``c - c_i`` to every gradient; both enter here as gradient terms on the flat
vector, so any model the adapters accept gets them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fedguard.data import augment
from fedguard.models.adapter import ModelAdapter, TorchModel


class LocalOptimizer(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    LBFGS = "lbfgs"
    NEWTON = "newton"


@dataclass(frozen=True)
class LocalTraining:
    """How one client trains in one round."""

    optimizer: LocalOptimizer = LocalOptimizer.SGD
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    proximal_mu: float = 0.0
    max_steps: int | None = None
    augment: str = "none"


@dataclass(frozen=True)
class TrainStats:
    """What local training reports back: mean training loss and optimizer steps taken."""

    loss: float
    steps: int
    num_examples: int


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(torch.split(order, batch_size))


def num_steps(n: int, cfg: LocalTraining) -> int:
    """Optimizer steps :func:`train` takes on ``n`` examples: ``ceil(n / batch_size)`` per
    epoch (the last batch may be smaller), capped at ``max_steps``."""
    steps = cfg.epochs * -(-n // cfg.batch_size)
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def batch_stream(
    x: torch.Tensor, y: torch.Tensor, cfg: LocalTraining, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``(x_b, y_b)`` of :func:`train`, one per optimizer step (:func:`num_steps` of
    them): each epoch a fresh permutation from ``generator``, cut into ``batch_size`` pieces,
    each augmented with ``generator`` when ``cfg.augment`` says so. Every draw from the
    generator happens when its batch is taken, so an engine that trains many clients at once
    and takes one batch of each client per step draws exactly what this client would."""
    n = int(y.shape[0])
    augment_fn = augment.get(cfg.augment)
    steps = 0
    for _ in range(cfg.epochs):
        for idx in _batches(n, cfg.batch_size, generator):
            xb = x[idx] if augment_fn is None else augment_fn(x[idx], generator)
            yield xb, y[idx]
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                return


def _add_gradient_terms(
    model: ModelAdapter,
    *,
    proximal_mu: float,
    global_params: torch.Tensor | None,
    correction: torch.Tensor | None,
) -> None:
    """Add the FedProx pull towards the global model and the SCAFFOLD correction to the grads."""
    for s in model.trainable():
        if s.param.grad is None:
            s.param.grad = torch.zeros_like(s.param)
        grad = s.param.grad
        if proximal_mu > 0.0 and global_params is not None:
            anchor = global_params[s.offset : s.offset + s.numel].view_as(s.param)
            grad.add_(s.param.detach() - anchor, alpha=proximal_mu)
        if correction is not None:
            grad.add_(correction[s.offset : s.offset + s.numel].view_as(s.param))


def _make_optimizer(cfg: LocalTraining, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer is LocalOptimizer.SGD:
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
    if cfg.optimizer is LocalOptimizer.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"No first-order optimizer called {cfg.optimizer!r}.")


def _nll(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.nll_loss(log_probs, y)


def train(
    model: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTraining,
    *,
    generator: torch.Generator,
    global_params: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    trained: Sequence[bool] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``(x, y)``; returns the mean loss over the steps taken.

    ``trained``: one flag per entry of ``model.trainable()``, the tensors the optimizer moves
    (None: all); the others stay as they are (personalisation trains a model's head and body
    in turn, :mod:`fedguard.client.personal`)."""
    if cfg.optimizer is LocalOptimizer.NEWTON:
        raise ValueError("The Newton solver computes statistics instead: use newton_statistics.")
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("This client holds no training examples.")
    slices = model.trainable()
    if trained is not None and len(trained) != len(slices):
        raise ValueError(f"{len(trained)} trained flags for {len(slices)} trainable tensors.")
    params = [s.param for i, s in enumerate(slices) if trained is None or trained[i]]
    if not params:
        raise ValueError("No trainable tensor is left to train.")
    model.train_mode(True)
    if cfg.optimizer is LocalOptimizer.LBFGS:
        return _train_lbfgs(model, x, y, cfg, params, global_params, correction)
    optimizer = _make_optimizer(cfg, params)
    extra = cfg.proximal_mu > 0.0 or correction is not None
    total, steps = torch.zeros(()), 0
    for xb, yb in batch_stream(x, y, cfg, generator):
        # Fresh gradients from backward rather than zero-fill then accumulate: the same
        # values, two fewer passes over the parameters per step.
        optimizer.zero_grad(set_to_none=True)
        loss = _nll(model.log_probabilities(xb, training=True), yb)
        loss.backward()
        if extra:
            _add_gradient_terms(
                model,
                proximal_mu=cfg.proximal_mu,
                global_params=global_params,
                correction=correction,
            )
        optimizer.step()
        total += loss.detach()
        steps += 1
    return TrainStats(float(total) / max(steps, 1), steps, n)


def _train_lbfgs(
    model: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTraining,
    params: list[torch.nn.Parameter],
    global_params: torch.Tensor | None,
    correction: torch.Tensor | None,
) -> TrainStats:
    """Full-batch L-BFGS with a strong-Wolfe line search; one ``step`` (<= 20 iterations) per epoch."""
    optimizer = torch.optim.LBFGS(params, lr=cfg.lr, max_iter=20, line_search_fn="strong_wolfe")
    last = torch.zeros(())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll(model.log_probabilities(x, training=True), y)
        if cfg.weight_decay > 0:
            loss = loss + 0.5 * cfg.weight_decay * sum((p * p).sum() for p in params)
        if cfg.proximal_mu > 0 and global_params is not None:
            loss = loss + 0.5 * cfg.proximal_mu * _distance_sq(model, global_params)
        if correction is not None:
            loss = loss + _linear_term(model, correction)
        loss.backward()
        return loss

    for _ in range(cfg.epochs):
        last = optimizer.step(closure)
    return TrainStats(float(last.detach()), cfg.epochs, int(y.shape[0]))


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` as a tensor (a zero scalar for no terms), added in order like ``sum``."""
    total = torch.zeros(())
    for i, term in enumerate(terms):
        total = term if i == 0 else total + term
    return total


def _distance_sq(model: ModelAdapter, anchor: torch.Tensor) -> torch.Tensor:
    return _total(
        ((s.param - anchor[s.offset : s.offset + s.numel].view_as(s.param)) ** 2).sum()
        for s in model.trainable()
    )


def _linear_term(model: ModelAdapter, correction: torch.Tensor) -> torch.Tensor:
    return _total(
        (s.param * correction[s.offset : s.offset + s.numel].view_as(s.param)).sum()
        for s in model.trainable()
    )


@dataclass(frozen=True)
class NewtonStatistics:
    """Sums over a client's examples of the loss gradient ``[P]`` and Hessian ``[P, P]``."""

    gradient_sum: torch.Tensor
    hessian_sum: torch.Tensor
    loss: float
    num_examples: int


MAX_NEWTON_PARAMETERS = 5000


def newton_statistics(
    model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float
) -> NewtonStatistics:
    """Gradient and Hessian sums of ``mean NLL + weight_decay/2 ||w||^2`` times ``n``.

    Taken over the trainable parameters as one vector, in the order of ``model.trainable()``.
    The Newton solver is for convex models (logistic regression), so the parameter count is
    capped; larger models should use L-BFGS.
    """
    slices = model.trainable()
    sizes = [s.numel for s in slices]
    total = sum(sizes)
    if total > MAX_NEWTON_PARAMETERS:
        raise ValueError(
            f"The Newton solver handles at most {MAX_NEWTON_PARAMETERS} parameters, this model has "
            f'{total}: use optimizer = "lbfgs" for larger models.'
        )
    if [s.offset for s in slices] != [t.offset for t in model.spec.tensors]:
        raise ValueError(
            "The Newton solver needs a model whose state is only trainable parameters (no buffers)."
        )
    if not isinstance(model, TorchModel):
        raise ValueError(
            "The Newton solver needs a PyTorch module (Keras layers do not take functional "
            'parameters): use optimizer = "lbfgs".'
        )
    module = model.module
    names = {id(p): name for name, p in module.named_parameters()}
    if any(id(s.param) not in names for s in slices):
        raise ValueError('The Newton solver needs a PyTorch module: use optimizer = "lbfgs".')
    n = int(y.shape[0])
    model.train_mode(False)
    flat0 = torch.cat([s.param.detach().reshape(-1) for s in slices]).to(torch.float64)

    def objective(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        params = {
            names[id(s.param)]: c.view_as(s.param) for s, c in zip(slices, chunks, strict=True)
        }
        out = torch.func.functional_call(module, params, (x.to(torch.float64),))
        log_probs = (
            torch.log(out.clamp_min(1e-12))
            if model.outputs_probabilities
            else (torch.log_softmax(out, dim=-1))
        )
        loss = torch.nn.functional.nll_loss(log_probs, y, reduction="sum")
        return loss + 0.5 * weight_decay * n * (flat * flat).sum()

    grad = torch.func.grad(objective)(flat0)
    hessian = torch.func.jacrev(torch.func.jacrev(objective))(flat0)
    loss = objective(flat0)
    return NewtonStatistics(grad.detach(), hessian.detach(), float(loss) / n, n)
