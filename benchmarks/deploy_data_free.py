"""The medical example deployed with a server that holds no data, against the same run simulated.

One ``fedguard server`` process and one ``fedguard client`` process per hospital on loopback,
with TLS and tokens, exactly as the README's Deploy walkthrough runs them. The server's copy
of the experiment file names a data path that does not exist and it runs in a temporary folder
(so the default ``../shared/data`` path leads nowhere either): it builds the model from
``[model]``, admits the hospitals by registration and takes its test metrics from their
federated evaluation (each hospital evaluates on its share of the test split). Each hospital
loads the public data set and keeps its own partition (``fedguard client FILE.toml
--client-id N``, the demo path). The simulation is ``fedguard.run`` on the same file, with the
central test set.

Reported per side: the final round's test accuracy, ROC AUC and loss, the wall time (the
deployment's from the server's start to its exit, process start-ups and registration included;
the simulation's around ``fedguard.run``) and the sum of the rounds' ``seconds``. Both sides
should end with the same parameters bit for bit (the same seeds, the same client code).

    python benchmarks/deploy_data_free.py --rounds 10
    python benchmarks/deploy_data_free.py --config examples/medical_imaging/deploy.toml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _final(run: Path) -> tuple[dict[str, Any], torch.Tensor]:
    from fedguard.experiment import checkpoint

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ck = checkpoint.latest(run / "checkpoints")
    if ck is None:
        raise RuntimeError(f"{run}: no checkpoint")
    last = rows[-1]
    return {
        "test_accuracy": last["test_accuracy"],
        "test_auc": last["test_auc"],
        "test_loss": last["test_loss"],
        "accuracy_per_round": [r["test_accuracy"] for r in rows],
        "seconds_rounds": sum(r["seconds"] for r in rows),
    }, ck.tensors["params"]


def deployed(config: Path, rounds: int, work: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """Run the server (without data) and one client process per hospital; their results."""
    from fedguard.runtime import auth, certs, grpc_launch

    cfg = tomllib.loads(config.read_text())
    clients = int(cfg["data"]["num_clients"])
    sec = work / "sec"
    auth.make_tokens(sec, range(clients))
    certs.make_dev_pki(sec, client_ids=[])
    server_dir = work / "server"
    server_dir.mkdir()
    blind = {**cfg, "data": {**cfg["data"], "path": str(work / "no-such-data.npz")}}
    (server_dir / "experiment.toml").write_text(tomli_w.dumps(blind))
    address = f"127.0.0.1:{grpc_launch.free_port()}"
    out = work / "deployed"
    python = [sys.executable, "-m", "fedguard.cli"]
    rounds_set = ["--set", f"experiment.rounds={rounds}"]
    started = time.perf_counter()
    server = subprocess.Popen(
        [
            *python,
            "server",
            "experiment.toml",
            "--address",
            address,
            "--tls-cert",
            str(sec / "server.pem"),
            "--tls-key",
            str(sec / "server.key"),
            "--tokens",
            str(sec / "tokens.json"),
            "--out",
            str(out),
            "--quiet",
            *rounds_set,
        ],
        cwd=server_dir,
        env=_env(),
    )
    hospitals = [
        subprocess.Popen(
            [
                *python,
                "client",
                str(config.resolve()),
                "--server",
                address,
                "--client-id",
                str(cid),
                "--ca",
                str(sec / "ca.pem"),
                "--token-file",
                str(sec / f"client-{cid}.token"),
                *rounds_set,
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
        )
        for cid in range(clients)
    ]
    try:
        code = server.wait()
        wall = time.perf_counter() - started
        for p in hospitals:
            p.wait(60)
    finally:
        grpc_launch.stop_all([server, *hospitals])
    if code != 0:
        raise RuntimeError(f"the server exited with {code}")
    result, params = _final(out)
    summary = json.loads((out / "summary.json").read_text())
    result |= {
        "seconds_wall": wall,
        "evaluation_mode": summary["evaluation_mode"],
        "clients_registered": summary["num_clients"],
    }
    return result, params


def simulated(config: Path, rounds: int, work: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """``fedguard.run`` of the same file (central test set), in this process."""
    import fedguard

    torch.set_num_threads(1)
    started = time.perf_counter()
    fedguard.run(
        config, out=work / "simulated", overrides=[f"experiment.rounds={rounds}"], progress=False
    )
    wall = time.perf_counter() - started
    result, params = _final(work / "simulated")
    return result | {"seconds_wall": wall, "evaluation_mode": "server"}, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=ROOT / "examples" / "medical_imaging" / "experiment.toml"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "deploy_data_free.json")
    args = parser.parse_args()
    os.chdir(ROOT)  # the example's data path is relative to the project root
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="fedguard-deploy-") as tmp:
        work = Path(tmp)
        deploy, deployed_params = deployed(args.config, args.rounds, work)
        sim, simulated_params = simulated(args.config, args.rounds, work)
    report = {
        "config": str(args.config.resolve().relative_to(ROOT)),
        "rounds": args.rounds,
        "deployed": deploy,
        "simulated": sim,
        "same_parameters": bool(torch.equal(deployed_params, simulated_params)),
        "max_abs_parameter_difference": float((deployed_params - simulated_params).abs().max()),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
