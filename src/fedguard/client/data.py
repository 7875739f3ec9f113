"""A client's local data, as the client's trainer and evaluation see it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClientData:
    """A client's local data as tensors: its training data and its held-out data (``eval_*``;
    None: none).

    ``own_eval``: the held-out data is the client's own (kept out of its training data, or
    from its own file), not its share of a central evaluation split that it holds in place of
    a split of its own. Only its own measures a personal model: a client whose held-out data
    is not its own answers a personal evaluation "no held-out data of its own"
    (:meth:`fedguard.client.app.ClientApp.evaluate`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None
    own_eval: bool = True

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])
