"""fedguard: federated learning with privacy and robustness that are measured and on by default.

The public API is ``run``, the protocols a user implements to plug in a strategy, an
aggregator, a client training loop or a simulated attack (named in a TOML as
``"package.module:name"``), and ``config_float`` / ``config_int``, which read a task's config
entries typed; see ``__all__``. Everything else may change between versions.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# fedguard runs Keras 3 on the torch backend, in the same process as PyTorch models; set it before
# anything imports Keras (an explicit KERAS_BACKEND from the user still wins, and is checked).
os.environ.setdefault("KERAS_BACKEND", "torch")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedguard.client.data import ClientData
    from fedguard.client.trainer import ClientTrainer, TrainResult, TrainTask
    from fedguard.experiment.plugin_context import PluginContext
    from fedguard.models.adapter import ModelAdapter
    from fedguard.protocol.aggregator import Aggregator, Condition, RoundContext
    from fedguard.protocol.messages import FitReply, config_float, config_int
    from fedguard.protocol.strategy import Strategy, StrategyState
    from fedguard.simulation.attack import Attack

# The protocols, imported on first use (``import fedguard`` stays light for the command line).
_PROTOCOLS = {
    "Aggregator": "fedguard.protocol.aggregator",
    "Condition": "fedguard.protocol.aggregator",
    "RoundContext": "fedguard.protocol.aggregator",
    "FitReply": "fedguard.protocol.messages",
    "config_float": "fedguard.protocol.messages",
    "config_int": "fedguard.protocol.messages",
    "Strategy": "fedguard.protocol.strategy",
    "StrategyState": "fedguard.protocol.strategy",
    "ClientData": "fedguard.client.app",
    "ModelAdapter": "fedguard.models.adapter",
    "ClientTrainer": "fedguard.client.trainer",
    "TrainTask": "fedguard.client.trainer",
    "TrainResult": "fedguard.client.trainer",
    "Attack": "fedguard.simulation.attack",
    "PluginContext": "fedguard.experiment.plugin_context",
}


def __getattr__(name: str) -> Any:
    module = _PROTOCOLS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedguard' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PROTOCOLS})


def run(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Run an experiment (config object, mapping or TOML path); see :func:`fedguard.experiment.runner.run`."""
    from fedguard.experiment import runner

    return runner.run(config, **kwargs)


__all__ = [
    "Aggregator",
    "Attack",
    "ClientData",
    "ClientTrainer",
    "Condition",
    "FitReply",
    "ModelAdapter",
    "PluginContext",
    "RoundContext",
    "Strategy",
    "StrategyState",
    "TrainResult",
    "TrainTask",
    "__version__",
    "config_float",
    "config_int",
    "run",
]
