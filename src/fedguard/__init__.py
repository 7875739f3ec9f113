"""fedguard: federated learning with privacy and robustness that are measured and on by default."""

from __future__ import annotations

import os
from typing import Any

# fedguard runs Keras 3 on the torch backend, in the same process as PyTorch models; set it before
# anything imports Keras (an explicit KERAS_BACKEND from the user still wins, and is checked).
os.environ.setdefault("KERAS_BACKEND", "torch")

__version__ = "0.1.0"


def run(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Run an experiment (config object, mapping or TOML path); see :func:`fedguard.experiment.runner.run`."""
    from fedguard.experiment import runner

    return runner.run(config, **kwargs)


__all__ = ["__version__", "run"]
