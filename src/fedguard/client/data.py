"""A client's local data, as the client's trainer and evaluation see it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClientData:
    """A client's local data as tensors; ``eval_*`` default to the training data."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])
