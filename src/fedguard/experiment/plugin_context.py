"""What fedguard hands a plug-in's factory besides its options: :class:`PluginContext`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedguard.client.trainer import ClientTrainer
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol.aggregator import Aggregator


@dataclass(frozen=True)
class PluginContext:
    """What fedguard offers a plug-in's factory besides its options (it gets this as ``context``
    if it declares a parameter of that name).

    ``seed``: the experiment's seed; ``num_clients`` and ``clients_per_round``: the federation;
    ``byzantine_f``: ``server.byzantine_f`` (None when unset); ``client_config``: the local
    training settings the clients are sent (``lr``, ``epochs``, ``batch_size``, ...);
    ``build_model``: a fresh copy of the run's model (same architecture and initialisation), for
    a server that trains on data of its own; ``trainer``: the run's client trainer;
    ``aggregator``: the run's aggregator (for a strategy). A part not known where the plug-in
    is loaded (a deployed client knows no aggregator) is None.
    """

    seed: int = 0
    num_clients: int | None = None
    clients_per_round: int | None = None
    byzantine_f: int | None = None
    client_config: Mapping[str, Any] = field(default_factory=dict)
    build_model: Callable[[], ModelAdapter] | None = None
    trainer: ClientTrainer | None = None
    aggregator: Aggregator | None = None
