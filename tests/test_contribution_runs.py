"""Contribution scores in real runs (issue 18, phase 2): digits, nine clients, two free riders
and one noisy client, scored through the run's own aggregation and optimizer step.

The setup (the ranking depends on it): scikit-learn's 8x8 digits (1797 images, 64 features
scaled to [0, 1], 10 classes), 1000 training images dealt IID to nine clients (111 or 112
each), 300 validation and 497 test images; a multinomial logistic regression; every client runs
one epoch of SGD (learning rate 0.1, batches of 16) per round; FedAvg, all nine clients every
round. ``[attack] kind = "free_rider"`` makes two clients (drawn with the attack's seed) send a
zero update while claiming their real example count; the data function shuffles all labels of
one more client (a noisy client, chosen among the others). The utility is the negative
validation loss: a zero update dilutes the weighted mean (a shorter step towards the optimum)
and shuffled labels pull it the wrong way, so the three have negative marginal value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedguard
from fedguard.algorithms import attacks
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.data.dataset import ArrayDataset, FederatedDataset
from fedguard.experiment import config as config_mod

CLIENTS = 9
ATTACK_SEED = 5
FREE_RIDERS = tuple(attacks.choose_malicious(list(range(CLIENTS)), 2 / CLIENTS, ATTACK_SEED))
NOISY = next(c for c in range(CLIENTS) if c not in FREE_RIDERS)
BAD = {*FREE_RIDERS, NOISY}


def digits_data() -> FederatedDataset:
    """Nine IID clients of digits, one with all its labels shuffled; validation and test sets."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    train_x, train_y = x[:1000], y[:1000]
    clients: dict[str, ArrayDataset] = {}
    for i, part in enumerate(np.array_split(np.arange(1000), CLIENTS)):
        labels = train_y[part]
        if i == NOISY:
            shuffled = attacks_data.shuffle_labels(
                torch.from_numpy(labels), probability=1.0, generator=torch.Generator().manual_seed(7)
            )
            labels = shuffled.numpy()
        clients[f"client_{i}"] = ArrayDataset(train_x[part], labels)
    return FederatedDataset(
        clients,
        ArrayDataset(x[1300:], y[1300:]),
        10,
        val=ArrayDataset(x[1000:1300], y[1000:1300]),
    )


def config(method: str, rounds: int = 4, **contribution: Any) -> dict[str, Any]:
    return {
        "experiment": {"name": "contrib", "seed": 1, "rounds": rounds},
        "data": {"num_clients": CLIENTS},
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg"},
        "attack": {"kind": "free_rider", "fraction": 2 / CLIENTS, "seed": ATTACK_SEED},
        "contribution": {"method": method, **contribution},
    }


def run(tmp_path: Path, name: str, cfg: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return fedguard.run(cfg, out=tmp_path / name, data_fn=digits_data, progress=False, **kwargs)


def read(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())
