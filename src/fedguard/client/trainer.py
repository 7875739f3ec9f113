"""The public ``ClientTrainer`` protocol: a client's local update in one round.

The client function (:class:`~fedguard.client.app.ClientApp`) decodes a fit task, loads the global
parameters into the model, and hands the rest to a trainer: the model, the client's data and a
:class:`TrainTask` (the global parameters, the strategy's fit config and tensors, a seeded
generator, the client's own state). The trainer returns a :class:`TrainResult`: the update
``local - global`` as one flat vector, the example count that weighs it and its metrics. What
happens to the update after it (central DP's clip, secure aggregation's masking) is the same for
every trainer.

fedguard's loops are trainers too (:mod:`fedguard.client.trainers`): ``client.optimizer``'s SGD,
Adam and L-BFGS loop (with FedProx's proximal term and SCAFFOLD's correction), DP-SGD, and the
Newton statistics. A trainer lists the :mod:`~fedguard.protocol.features` it applies; a run whose
strategy or privacy mode needs one it lacks is refused before round 1.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import messages

if TYPE_CHECKING:
    from fedguard.client.data import ClientData


@dataclass(frozen=True)
class TrainTask:
    """One client's training in one round.

    ``params`` are the global parameters ``[D]``, already loaded into the model when
    :meth:`ClientTrainer.train` is called. ``config`` is the strategy's fit config: ``lr``,
    ``epochs``, ``batch_size``, ``optimizer`` and the rest of ``[client]``, plus what a strategy
    or privacy mode adds (``proximal_mu``, the DP-SGD noise and clip). ``tensors`` are the
    strategy's extra tensors (SCAFFOLD's ``control``). ``generator`` is seeded per (run seed,
    round, client): draw every shuffle from it, so that runs repeat. ``state`` is the client's
    own state across rounds (SCAFFOLD's control variate), saved in the run's checkpoints.
    """

    client_id: int
    round: int
    params: torch.Tensor
    config: Mapping[str, messages.Scalar]
    tensors: Mapping[str, torch.Tensor]
    generator: torch.Generator
    state: MutableMapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """The local update ``local - global`` ``[D]``, the examples it weighs as, its metrics
    (``train_loss`` is averaged over the round's clients; others are passed on) and any tensors
    the strategy asks the replies to carry."""

    update: torch.Tensor
    num_examples: int
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class ClientTrainer(abc.ABC):
    """A client's local training: the update from the global parameters, its data and the task.

    ``features`` names what it applies beyond plain training (see
    :mod:`fedguard.protocol.features`); the default, none, suits a FedAvg-style loop.
    """

    features: frozenset[str] = frozenset()

    @abc.abstractmethod
    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        """Train ``model`` (holding ``task.params``) on ``data``; return the update."""
