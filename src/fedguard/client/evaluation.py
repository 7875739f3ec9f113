"""Evaluation of a model on labelled data: loss, accuracy and (optionally) class probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.client.model import ModelAdapter


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy over ``num_examples``; ``probabilities`` is ``[N, C]`` when kept."""

    loss: float
    accuracy: float
    num_examples: int
    probabilities: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    keep_probabilities: bool = False,
) -> EvalResult:
    """Evaluate in inference mode, batch by batch, so memory stays bounded on large test sets."""
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
        if keep_probabilities:
            kept.append(log_probs.exp())
    probabilities = torch.cat(kept) if keep_probabilities else None
    return EvalResult(loss_sum / n, correct / n, n, probabilities)
