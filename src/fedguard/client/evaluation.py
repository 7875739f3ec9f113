"""Evaluation of a model on labelled data: loss, accuracy and (optionally) class probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.models.adapter import ModelAdapter


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy over ``num_examples``; ``probabilities`` is ``[N, C]`` when kept."""

    loss: float
    accuracy: float
    num_examples: int
    probabilities: torch.Tensor | None = None


def evaluate(
    model: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    keep_probabilities: bool = False,
) -> EvalResult:
    """Evaluate in inference mode, batch by batch, so memory stays bounded on large test sets."""
    loss_sum, correct, n, kept = _run(model, x, y, batch_size, keep_probabilities)
    probabilities = torch.cat(kept) if keep_probabilities else None
    return EvalResult(loss_sum / n, correct / n, n, probabilities)


def evaluate_with_probabilities(
    model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> tuple[EvalResult, torch.Tensor]:
    """:func:`evaluate` keeping the probabilities, and those probabilities ``[N, C]``."""
    loss_sum, correct, n, kept = _run(model, x, y, batch_size, True)
    probabilities = torch.cat(kept)
    return EvalResult(loss_sum / n, correct / n, n, probabilities), probabilities


@torch.no_grad()
def _run(
    model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, batch_size: int, keep: bool
) -> tuple[float, int, int, list[torch.Tensor]]:
    """The summed loss, the correct predictions, the example count and (``keep``) the batches'
    probabilities."""
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("Cannot evaluate on an empty data set.")
    model.train_mode(False)
    loss_sum, correct, kept = 0.0, 0, []
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        log_probs = model.log_probabilities(xb, training=False)
        loss_sum += float(torch.nn.functional.nll_loss(log_probs, yb, reduction="sum"))
        correct += int((log_probs.argmax(dim=1) == yb).sum())
        if keep:
            kept.append(log_probs.exp())
    return loss_sum, correct, n, kept
