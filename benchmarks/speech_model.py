"""The built-in speech models on spoken digits with plain settings, per round, over seeds.

Each run is ``fedguard.run`` on FSDD (the shared data folder's ``fsdd``; ``--data`` for another
copy) with the settings a user would try first: FedAvg, Adam with lr 1e-3, one local epoch,
batch 32, the default log-mel features, every client in every round, evaluation on the official
test takes after every round. Only the model, the seed and the partition change: ``natural``
(six households, one per speaker: the smart-home example's split) or ``iid`` (the library's
default partition and client count: ten clients with random recordings).
Writes ``benchmarks/results/speech_model.json``: one row per (partition, seed, model, round) with
``test_accuracy``, ``train_loss`` and ``seconds`` (the round's wall time, training and
evaluation), and per (partition, model, seed) the accuracy after the last round.

    python benchmarks/speech_model.py --seeds 0 1 2 --models speech_cnn brief_speech_cnn
    python benchmarks/speech_model.py --partition iid

Rows of a (partition, model, seed) not run this time are kept from an existing result file, so
runs can go in separate processes and be merged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import fedguard

ROOT = Path(__file__).resolve().parent.parent
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "speech_model.json"


PARTITIONS = {"natural": 6, "iid": 10}  # partition -> clients


def plain_config(
    model: str, seed: int, rounds: int, data: Path, partition: str = "natural"
) -> dict[str, Any]:
    """The experiment: plain settings, only ``model``, ``seed`` and ``partition`` vary."""
    return {
        "experiment": {"name": f"speech-{model}-{seed}", "seed": seed, "rounds": rounds},
        "data": {
            "dataset": "fsdd",
            "path": str(data),
            "partition": partition,
            "num_clients": PARTITIONS[partition],
        },
        "model": {"name": model},
        "client": {"optimizer": "adam", "lr": 1e-3, "epochs": 1, "batch_size": 32},
        "server": {"strategy": "fedavg"},
        "evaluation": {"every": 1},
    }


def run_one(model: str, seed: int, rounds: int, data: Path, partition: str) -> list[dict[str, Any]]:
    """One run's rows, one per round."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = plain_config(model, seed, rounds, data, partition)
        fedguard.run(cfg, out=out, progress=False)
        lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = []
    for line in lines:
        r = json.loads(line)
        rows.append(
            {
                "partition": partition,
                "seed": seed,
                "model": model,
                "round": r["round"],
                "test_accuracy": r["test_accuracy"],
                "train_loss": r["train_loss"],
                "seconds": r["seconds"],
            }
        )
    return rows


def final_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (partition, model, seed): the last round's accuracy and the mean seconds per round."""
    table = []
    for partition, model, seed in sorted({_key(r) for r in rows}):
        mine = sorted(
            (r for r in rows if _key(r) == (partition, model, seed)), key=lambda r: r["round"]
        )
        table.append(
            {
                "partition": partition,
                "model": model,
                "seed": seed,
                "rounds": mine[-1]["round"],
                "final_test_accuracy": mine[-1]["test_accuracy"],
                "final_train_loss": mine[-1]["train_loss"],
                "seconds_per_round": sum(r["seconds"] for r in mine) / len(mine),
            }
        )
    return table


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return (row.get("partition", "natural"), row["model"], row["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["speech_cnn", "brief_speech_cnn"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", choices=sorted(PARTITIONS), default="natural")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=FSDD)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    kept: list[dict[str, Any]] = []
    if args.out.exists():
        ran = {(args.partition, m, s) for m in args.models for s in args.seeds}
        old = json.loads(args.out.read_text())["rows"]
        kept = [{"partition": "natural", **r} for r in old if _key(r) not in ran]
    rows = list(kept)
    for model in args.models:
        for seed in args.seeds:
            new = run_one(model, seed, args.rounds, args.data, args.partition)
            last = new[-1]
            print(
                f"{args.partition} {model} seed {seed}: round {last['round']} "
                f"accuracy {last['test_accuracy']:.3f}",
                flush=True,
            )
            rows.extend(new)
            _write(args, rows)  # after every run: a stopped benchmark keeps what finished
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda r: (*_key(r), r["round"]))
    result = {
        "settings": {
            p: plain_config("<model>", 0, args.rounds, Path("fsdd"), p) for p in PARTITIONS
        },
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "final": final_table(rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
