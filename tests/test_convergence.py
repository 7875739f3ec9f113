"""Client drift: on a label-skewed logistic regression, SCAFFOLD and FedProx beat FedAvg.

Five clients each hold one class of a 5-class synthetic problem (``shards`` with one shard per
client), and every round each client runs 10 local epochs of SGD at a large learning rate (50
steps, weight decay 0.03). Each local model then runs towards "always predict my class", the
average of those models is a poor model, and FedAvg stalls at a loss far above the optimum from
round 3 on. FedProx's proximal term (Li et al. 2020) holds the local models near the global one,
and SCAFFOLD's control variates (Karimireddy et al. 2020) cancel the drift, so both keep
descending.

Measured with torch 2.13 on CPU (seed 0, 10 rounds); pooled training cross-entropy of the global
model per round:

    FedAvg    0.831 0.640 0.593 0.582 0.577 0.578 0.573 0.576 0.573 0.571
    FedProx   1.314 0.871 0.632 0.494 0.412 0.357 0.318 0.290 0.272 0.259   (mu = 0.3)
    SCAFFOLD  0.831 0.457 0.315 0.245 0.204 0.176 0.157 0.143 0.133 0.126

and after round 10 on the central test set: FedAvg 0.622, FedProx 0.317, SCAFFOLD 0.180.
The same ordering holds with seeds 1 and 2 (FedAvg / FedProx / SCAFFOLD training loss after
round 10: 0.577 / 0.261 / 0.115 and 0.579 / 0.253 / 0.119).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fedguard
from fedguard.client import evaluation
from fedguard.experiment import checkpoint
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment

ROUNDS = 10
PROXIMAL_MU = 0.3


def _config(strategy: str, proximal_mu: float = 0.0) -> dict[str, Any]:
    return {
        "experiment": {"name": f"drift_{strategy}", "seed": 0, "rounds": ROUNDS},
        "data": {
            "dataset": "synthetic",
            "synthetic_samples": 250,
            "synthetic_shape": [20],
            "synthetic_classes": 5,
            "partition": "shards",
            "shards_per_client": 1,  # one class per client: the strongest label skew
            "num_clients": 5,
        },
        "model": {"name": "logistic_regression"},
        "client": {
            "optimizer": "sgd",
            "lr": 0.5,
            "epochs": 10,
            "batch_size": 10,
            "weight_decay": 0.03,  # finite local optima: FedAvg's drift shows as a plateau
            "proximal_mu": proximal_mu,
        },
        "server": {"strategy": strategy},
        # Evaluate after the last round only (the pooled training loss is computed below).
        "evaluation": {"every": 0},
    }


def _final_losses(strategy: str, out: Path, proximal_mu: float = 0.0) -> tuple[float, float]:
    """(pooled training loss, central test loss) of the global model after the last round."""
    summary = fedguard.run(_config(strategy, proximal_mu), out=out, progress=False)
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == ROUNDS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["round"] == ROUNDS
    assert last["test_loss"] == summary["test_loss"]
    return _pooled_training_loss(_config(strategy, proximal_mu), out), float(last["test_loss"])


def _pooled_training_loss(cfg: dict[str, Any], out: Path) -> float:
    """The global model's mean cross-entropy over every client's training examples."""
    exp = Experiment(config_mod.validate(cfg))
    ck = checkpoint.latest(out / "checkpoints")
    assert ck is not None and ck.round == ROUNDS
    exp.model.set_flat(ck.tensors["params"])
    x = torch.cat([d.train_x for d in exp.fed.clients.values()])
    y = torch.cat([d.train_y for d in exp.fed.clients.values()])
    return evaluation.evaluate(exp.model, x, y).loss


@pytest.fixture(scope="module")
def losses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[float, float]]:
    # Tiny models run fastest on one thread: intra-op threads only contend on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("drift")
        return {
            "fedavg": _final_losses("fedavg", root / "fedavg"),
            "fedprox": _final_losses("fedprox", root / "fedprox", PROXIMAL_MU),
            "scaffold": _final_losses("scaffold", root / "scaffold"),
        }
    finally:
        torch.set_num_threads(before)


def test_fedavg_stalls_under_client_drift(losses: dict[str, tuple[float, float]]) -> None:
    train, test = losses["fedavg"]
    # Measured: 0.571 train, 0.622 test (the optimum is far lower, see SCAFFOLD below).
    assert train == pytest.approx(0.571, abs=0.03)
    assert test == pytest.approx(0.622, abs=0.03)


def test_scaffold_beats_fedavg(losses: dict[str, tuple[float, float]]) -> None:
    fedavg_train, fedavg_test = losses["fedavg"]
    train, test = losses["scaffold"]
    # Measured: SCAFFOLD 0.126 train / 0.180 test vs FedAvg 0.571 / 0.622.
    assert train < fedavg_train - 0.3
    assert test < fedavg_test - 0.3


def test_fedprox_beats_fedavg(losses: dict[str, tuple[float, float]]) -> None:
    fedavg_train, fedavg_test = losses["fedavg"]
    train, test = losses["fedprox"]
    # Measured: FedProx (mu = 0.3) 0.259 train / 0.317 test vs FedAvg 0.571 / 0.622.
    assert train < fedavg_train - 0.2
    assert test < fedavg_test - 0.2


def test_scaffold_beats_fedprox(losses: dict[str, tuple[float, float]]) -> None:
    # Measured: 0.126 vs 0.259 (SCAFFOLD removes the drift, FedProx only damps it).
    assert losses["scaffold"][0] < losses["fedprox"][0] - 0.05
