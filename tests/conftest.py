"""Shared fixtures: small configs that run in well under a second per round."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(**sections: dict) -> dict:
    """A synthetic logistic-regression experiment; ``sections`` update its tables."""
    cfg = {
        "experiment": {"name": "tiny", "seed": 3, "rounds": 3},
        "data": {
            "dataset": "synthetic",
            "num_clients": 6,
            "synthetic_samples": 600,
            "synthetic_shape": [1, 6, 6],
            "synthetic_classes": 3,
            "partition": "dirichlet",
            "alpha": 1.0,
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg", "clients_per_round": 4},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def pneumonia_path() -> Path:
    path = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"
    if not path.exists():
        pytest.skip(f"data file {path} is not present")
    return path
