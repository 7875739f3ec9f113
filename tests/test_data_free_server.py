"""A deployed server that never sees the data, end to end over gRPC with TLS.

The server process is told that the data set lives at a path that does not exist, and runs in
a folder from which the default data path points nowhere: it builds its model from the config,
learns the clients' sizes from their registrations and the test metrics from their federated
evaluations. Three hospitals hold their PneumoniaMNIST partitions and their shares of the test
split in their own ``.npz`` files (``fedguard client --data``); a fourth runs another model and
is refused at registration (it exits with code 2, the run goes on without it). The deployed run
equals the in-process simulation of the same three clients: the same parameters bit for bit,
the same accuracy in every round (counted from the clients' confusion matrices), the loss
within 1e-6 relatively (the same losses summed in another order) and the AUC within 2e-3 (the
clients report score histograms of 1,000 bins; the simulation computes the exact AUC).

The server and the clients run their ``fedguard server`` and ``fedguard client`` command lines
(``cli.main``) as separate processes, each in its own folder with its output in its own log,
forked from the harness's interpreter that has torch and fedguard imported (five fresh
``python -m fedguard.cli`` interpreters took most of a minute to import them on two busy cores).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from test_grpc_harness import final_params, losses_match, make_security, start_cli

import fedguard
from conftest import SHARED_DATA, metric_rows
from fedguard import cli
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.runtime import auth, grpc_launch

ROUNDS = 3
CLIENTS = 3
IMPOSTOR = 3  # a fourth client whose model is not the server's
AUC_TOLERANCE = 2e-3
TIMEOUT_S = 240.0


def medical_config(path: Path) -> dict:
    """Three hospitals with label-skewed PneumoniaMNIST partitions, logistic regression."""
    return {
        "experiment": {"name": "data_free", "seed": 4, "rounds": ROUNDS},
        "data": {
            "dataset": "pneumoniamnist",
            "path": str(path),
            "partition": "dirichlet",
            "alpha": 0.5,
            "num_clients": CLIENTS,
        },
        "model": {
            "name": "logistic_regression",
            "input_shape": [1, 28, 28],
            "num_classes": 2,
        },
        "client": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 32},
        "server": {"strategy": "fedavg", "clients_per_round": CLIENTS, "deadline_s": 60.0},
        "evaluation": {"every": 1, "mode": "federated"},
    }


def export_clients(cfg: dict, folder: Path) -> list[Path]:
    """Each simulated client's partition and held-out share, as its own ``.npz``."""
    exp = Experiment(config_mod.validate(cfg))
    files = []
    for cid, d in exp.fed.clients.items():
        assert d.eval_x is not None and d.eval_y is not None
        path = folder / f"hospital-{cid}.npz"
        np.savez(
            path,
            x=d.train_x.numpy(),
            y=d.train_y.numpy(),
            x_eval=d.eval_x.numpy(),
            y_eval=d.eval_y.numpy(),
        )
        files.append(path)
    return files


def _cli(*args: str, cwd: Path, log: Path) -> multiprocessing.process.BaseProcess:
    """``fedguard ARGS`` in a process of its own, run from ``cwd``, its output in ``log``."""
    return start_cli(list(args), cwd, log)


def _wait(process: multiprocessing.process.BaseProcess, timeout_s: float) -> int | None:
    process.join(timeout_s)
    return process.exitcode


@pytest.mark.shared_data
def test_a_data_free_server_over_tls_matches_the_simulation(tmp_path) -> None:
    data = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"
    cfg = medical_config(data)
    files = export_clients(cfg, tmp_path)
    # The server's copy of the config names a data set that does not exist, and it runs in a
    # folder where the default ../shared/data path leads nowhere either.
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    missing = tmp_path / "no-such-folder" / "pneumoniamnist.npz"
    config = server_dir / "experiment.toml"
    config.write_text(tomli_w.dumps({**cfg, "data": {**cfg["data"], "path": str(missing)}}))
    sec = make_security(tmp_path / "sec", range(CLIENTS + 1))
    address = f"127.0.0.1:{grpc_launch.free_port()}"
    out = tmp_path / "deployed"
    server = _cli(
        "server",
        str(config),
        "--address",
        address,
        "--tls-cert",
        str(sec.directory / "server.pem"),
        "--tls-key",
        str(sec.directory / "server.key"),
        "--tokens",
        str(sec.directory / "tokens.json"),
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"data.num_clients={CLIENTS + 1}",  # the impostor may connect, and is refused
        cwd=server_dir,
        log=tmp_path / "server.log",
    )
    clients = {}
    for cid in range(CLIENTS + 1):
        model = "image_cnn" if cid == IMPOSTOR else "logistic_regression"
        clients[cid] = _cli(
            "client",
            str(config),
            "--server",
            address,
            "--client-id",
            str(cid),
            "--ca",
            str(sec.directory / "ca.pem"),
            "--token-file",
            str(sec.directory / f"client-{cid}.token"),
            "--data",
            str(files[cid % CLIENTS]),
            "--model",
            model,
            "--num-classes",
            "2",
            "--set",
            f"data.num_clients={CLIENTS + 1}",
            cwd=tmp_path,
            log=tmp_path / f"client-{cid}.log",
        )
    started = time.monotonic()
    try:
        code = _wait(server, TIMEOUT_S)
        exits = {cid: _wait(p, 30) for cid, p in clients.items()}
    finally:
        for p in [server, *clients.values()]:
            if p.is_alive():
                p.kill()
                p.join(10)
    seconds = time.monotonic() - started
    server_log = (tmp_path / "server.log").read_text()
    assert code == 0, server_log
    assert exits == {0: 0, 1: 0, 2: 0, IMPOSTOR: 2}, exits
    impostor = (tmp_path / f"client-{IMPOSTOR}.log").read_text()
    assert "the server's model (signature" in impostor and "is not this client's" in impostor
    assert "Traceback" not in impostor
    assert not missing.exists() and not (server_dir.parent / "shared").exists()

    simulated = tmp_path / "simulated"
    fedguard.run(cfg, out=simulated, progress=False, overrides=["evaluation.mode=server"])
    rows, sim = metric_rows(out), metric_rows(simulated)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [r["clients_completed"] for r in rows] == [CLIENTS] * ROUNDS
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in sim]
    assert losses_match([r["test_loss"] for r in rows], [r["test_loss"] for r in sim])
    for d, s in zip(rows, sim, strict=True):
        assert d["test_auc"] == pytest.approx(s["test_auc"], abs=AUC_TOLERANCE)
    # a real model, not a constant: measured accuracy 0.784, AUC 0.912 after three rounds
    assert 0.7 < rows[-1]["test_accuracy"] < 0.95 and rows[-1]["test_auc"] > 0.8
    (rd, pd), (rs, ps) = final_params(out), final_params(simulated)
    assert rd == rs == ROUNDS and torch.equal(pd, ps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == CLIENTS and summary["evaluation_mode"] == "federated"
    assert sum(map(sum, summary["confusion_matrix"])) == 468  # the whole test split
    partition = json.loads((out / "partition.json").read_text())
    assert partition["source"] == "registrations"
    assert [c["id"] for c in partition["clients"]] == [0, 1, 2]
    assert {c["label_counts"] for c in partition["clients"]} == {None}
    assert "the server's model (signature" in partition["refused"][str(IMPOSTOR)]
    assert (out / "plots" / "accuracy.png").exists() and (out / "plots" / "partition.png").exists()
    assert seconds < TIMEOUT_S


def test_a_server_that_cannot_build_its_model_stops_in_one_line(tmp_path, capsys) -> None:
    cfg = medical_config(tmp_path / "missing.npz")
    del cfg["model"]["input_shape"]
    config = tmp_path / "experiment.toml"
    config.write_text(tomli_w.dumps(cfg))
    auth.make_tokens(tmp_path, [0])
    code = cli.main(
        [
            "server",
            str(config),
            "--address",
            "127.0.0.1:0",
            "--tokens",
            str(tmp_path / "tokens.json"),
            "--insecure",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "model.input_shape: a server without the data set builds its model" in lines[0]
    assert not (tmp_path / "run").exists()
