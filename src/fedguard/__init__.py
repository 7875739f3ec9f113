"""fedguard: federated learning with privacy and robustness that are measured and on by default."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Run an experiment (config object, mapping or TOML path); see :func:`fedguard.experiment.runner.run`."""
    from fedguard.experiment import runner

    return runner.run(config, **kwargs)


__all__ = ["__version__", "run"]
