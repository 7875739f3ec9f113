"""Asynchronous (FedBuff) against synchronous rounds when some clients are slow: the simulated
time to reach the synchronous run's final accuracy.

Task: the medical example (``examples/medical_imaging/experiment.toml``: PneumoniaMNIST 28x28,
10 hospitals of a Dirichlet(0.5) partition, ``image_cnn``, Adam lr 1e-3, two local epochs in
batches of 32 with image augmentation, FedAvg), every hospital in every synchronous round,
evaluated on the test split after every round. Latency model (``[runtime.latency]``): a
log-normal base of mean 1 s (sigma 0.3) per task, and 10% of the hospitals (one of ten, drawn
with the seed) 10x slower. A synchronous round lasts as long as its slowest hospital; the
asynchronous run keeps all ten hospitals busy (``concurrency = 10``) and steps the server every
``buffer_size`` replies (10 and 5 by default; FedBuff's staleness weight ``1/sqrt(1 + tau)``, the same server
optimizer, FedAvg with learning rate 1).

Measured, per seed: the synchronous run's final test accuracy ``target``; the simulated seconds
at which each run's evaluated accuracy first reaches ``target`` (``reached_s``); and the ratio
``async reached_s / sync reached_s`` (goal: at most 0.6). The synchronous run reaches ``target``
at its last round or earlier, so its ``reached_s`` is at most its total simulated time; the
ratio against its total time is given too (``ratio_vs_sync_total``). The asynchronous run gets
``async_updates_factor`` times the synchronous run's client updates (its rounds are
``factor * sync updates / buffer_size`` buffers); if it never reaches ``target`` its
``reached_s`` is null. Real seconds (both runs train on this machine, one client at a time) are
recorded beside the simulated ones; they measure the compute spent, not the latency modelled.
``summary`` gives, per buffer size, the median ratio over the seeds, and the same comparison at
99% and 98% of the target (a run evaluated after every buffer has more chances to touch one
evaluation's noise; a target a hair below the final accuracy shows whether a miss is a plateau).
``--summarise FILE`` recomputes the summary from a result file's stored curves.

Usage::

    python benchmarks/async_rounds.py                       # the medical example, 2 seeds
    python benchmarks/async_rounds.py --rounds 20 --epochs 1 --augment none   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

import fedguard

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# shares of the synchronous run's final accuracy at which the times are compared too
FRACTIONS = (1.0, 0.99, 0.98)
SLACK = 0.02  # sustained: later evaluations may fall this far below the target
LATENCY = {"base": "lognormal", "mean_s": 1.0, "sigma": 0.3, "slow_fraction": 0.1, "slowdown": 10.0}


def task_config(
    seed: int, rounds: int, epochs: int, data_root: Path, augment: str = "image"
) -> dict[str, Any]:
    """The medical example with the latency model, evaluated every round, no checkpoints kept
    beyond the last."""
    cfg = tomllib.loads((ROOT / "examples" / "medical_imaging" / "experiment.toml").read_text())
    cfg["data"]["path"] = str(data_root / "medmnist" / "pneumoniamnist.npz")
    cfg["experiment"].update({"name": "async_rounds", "seed": seed, "rounds": rounds})
    cfg["client"].update({"epochs": epochs, "augment": augment})
    cfg["evaluation"] = {"every": 1, "split": "test"}
    cfg["checkpoint"] = {"keep": 1}
    cfg["runtime"] = {"latency": dict(LATENCY)}
    return cfg


def curve(folder: Path) -> list[dict[str, Any]]:
    """Per round: its simulated seconds, test accuracy, client updates applied, real seconds."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "round": r["round"],
            "simulated_s": r["simulated_seconds"],
            "accuracy": r["test_accuracy"],
            "updates": r["clients_completed"],
            "seconds": r["seconds"],
        }
        for r in rows
    ]


def reached(points: list[dict[str, Any]], target: float) -> float | None:
    """The simulated seconds of the first evaluation at or above ``target`` (None: never)."""
    for p in points:
        if p["accuracy"] is not None and p["accuracy"] >= target:
            return float(p["simulated_s"])
    return None


def sustained(points: list[dict[str, Any]], target: float, slack: float) -> float | None:
    """The simulated seconds from which every later evaluation is at least ``target - slack``
    and the first of them at least ``target`` (None: never). Less sensitive than
    :func:`reached` to one lucky evaluation, of which a run evaluated more often has more."""
    for i, p in enumerate(points):
        if p["accuracy"] >= target and all(q["accuracy"] >= target - slack for q in points[i:]):
            return float(p["simulated_s"])
    return None


def async_run(
    seed: int,
    buffer_size: int,
    updates: int,
    factor: float,
    epochs: int,
    data_root: Path,
    augment: str,
    target: float,
    sync: list[dict[str, Any]],
    tmp: Path,
) -> dict[str, Any]:
    """One asynchronous run with ``factor`` times the synchronous run's client updates."""
    buffers = max(1, round(factor * updates / buffer_size))
    cfg = task_config(seed, buffers, epochs, data_root, augment)
    cfg["server"].update(
        {"mode": "async", "concurrency": cfg["data"]["num_clients"], "buffer_size": buffer_size}
    )
    t0 = time.perf_counter()
    fedguard.run(cfg, out=tmp / f"async_{buffer_size}", progress=False)
    real = time.perf_counter() - t0
    points = curve(tmp / f"async_{buffer_size}")
    at, held = reached(points, target), sustained(points, target, SLACK)
    sync_at, sync_held = reached(sync, target), sustained(sync, target, SLACK)
    return {
        "buffer_size": buffer_size,
        "rounds": len(points),
        "updates": sum(p["updates"] for p in points),
        "reached_s": at,
        "sustained_s": held,
        "total_simulated_s": points[-1]["simulated_s"],
        "final_accuracy": points[-1]["accuracy"],
        "best_accuracy": max(p["accuracy"] for p in points),
        "real_s": real,
        "ratio": None if at is None or not sync_at else at / sync_at,
        "ratio_vs_sync_total": None if at is None else at / sync[-1]["simulated_s"],
        "ratio_sustained": None if held is None or not sync_held else held / sync_held,
        "curve": points,
    }


def one_seed(
    seed: int,
    rounds: int,
    epochs: int,
    buffer_sizes: list[int],
    factor: float,
    data_root: Path,
    augment: str,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        t0 = time.perf_counter()
        fedguard.run(
            task_config(seed, rounds, epochs, data_root, augment), out=tmp / "sync", progress=False
        )
        sync_real = time.perf_counter() - t0
        sync = curve(tmp / "sync")
        updates = sum(p["updates"] for p in sync)
        target = sync[-1]["accuracy"]
        runs = [
            async_run(seed, k, updates, factor, epochs, data_root, augment, target, sync, tmp)
            for k in buffer_sizes
        ]
    return {
        "seed": seed,
        "target_accuracy": target,
        "sync": {
            "rounds": len(sync),
            "updates": updates,
            "reached_s": reached(sync, target),
            "sustained_s": sustained(sync, target, SLACK),
            "total_simulated_s": sync[-1]["simulated_s"],
            "real_s": sync_real,
            "curve": sync,
        },
        "async": runs,
    }


def summarise(rows: list[dict[str, Any]], buffer_sizes: list[int]) -> dict[str, Any]:
    """Per buffer size: the median ratios over the seeds and how many seeds reached the
    target; and at ``FRACTIONS`` of the target (the time each run first reaches that share of
    the synchronous run's final accuracy), from the stored curves."""
    summary: dict[str, Any] = {}
    for k in buffer_sizes:
        runs = [(r, a) for r in rows for a in r["async"] if a["buffer_size"] == k]
        ratios = [a["ratio"] for _, a in runs if a["ratio"] is not None]
        held = [a["ratio_sustained"] for _, a in runs if a["ratio_sustained"] is not None]
        at_fraction = {}
        for f in FRACTIONS:
            per_seed = []
            for r, a in runs:
                goal = f * r["target_accuracy"]
                sync_at, async_at = reached(r["sync"]["curve"], goal), reached(a["curve"], goal)
                per_seed.append(
                    {
                        "seed": r["seed"],
                        "accuracy": goal,
                        "sync_s": sync_at,
                        "async_s": async_at,
                        "ratio": None if async_at is None or not sync_at else async_at / sync_at,
                    }
                )
            got = [p["ratio"] for p in per_seed if p["ratio"] is not None]
            at_fraction[str(f)] = {
                "ratio_median": statistics.median(got) if got else None,
                "seeds_reached": f"{len(got)} of {len(per_seed)}",
                "per_seed": per_seed,
            }
        summary[f"buffer_size={k}"] = {
            "ratio_median": statistics.median(ratios) if ratios else None,
            "seeds_reached": f"{len(ratios)} of {len(runs)}",
            "ratio_sustained_median": statistics.median(held) if held else None,
            "seeds_sustained": f"{len(held)} of {len(runs)}",
            "at_fraction_of_target": at_fraction,
        }
    return summary


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=30, help="synchronous rounds")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs (the example: 2)")
    parser.add_argument("--buffer-sizes", type=int, nargs="+", default=[10, 5])
    parser.add_argument("--async-updates-factor", type=float, default=1.5)
    parser.add_argument("--augment", default="image", help='the example: "image"; or "none"')
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "async_rounds.json")
    parser.add_argument(
        "--summarise", type=Path, help="recompute the summary of a saved result file, no runs"
    )
    args = parser.parse_args()
    if args.summarise is not None:
        saved = json.loads(args.summarise.read_text())
        saved["summary"] = summarise(saved["rows"], saved["settings"]["buffer_sizes"])
        args.summarise.write_text(json.dumps(saved, indent=1) + "\n")
        print(json.dumps(saved["summary"], indent=1))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        row = one_seed(
            seed,
            args.rounds,
            args.epochs,
            args.buffer_sizes,
            args.async_updates_factor,
            args.data,
            args.augment,
        )
        rows.append(row)
        for a in row["async"]:
            print(
                f"seed {seed}: target {row['target_accuracy']:.4f}, sync reached at "
                f"{row['sync']['reached_s']} s (total {row['sync']['total_simulated_s']:.1f} s), "
                f"async K={a['buffer_size']} at {a['reached_s']} s: ratio {a['ratio']}, "
                f"sustained {a['ratio_sustained']}",
                flush=True,
            )
    summary = summarise(rows, args.buffer_sizes)
    result = {
        "task": "medical example (PneumoniaMNIST, 10 hospitals, Dirichlet 0.5, image_cnn)",
        "latency": LATENCY,
        "settings": {
            "sync_rounds": args.rounds,
            "epochs": args.epochs,
            "augment": args.augment,
            "threads": args.threads,
            "buffer_sizes": args.buffer_sizes,
            "concurrency": 10,
            "staleness_exponent": 0.5,
            "async_updates_factor": args.async_updates_factor,
        },
        "summary": summary,
        "rows": rows,
        "goal": "async reached_s / sync reached_s <= 0.6",
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
