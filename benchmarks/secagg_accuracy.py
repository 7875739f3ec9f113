"""Accuracy of the medical example with and without secure aggregation (same seed, 30 rounds).

Runs ``examples/medical_imaging/experiment.toml`` twice through ``fedguard.run``: as it is
(plain FedAvg over float32 updates) and with ``[secure_aggregation]`` on (SecAgg+, 32-bit ring,
weighted by example counts, every update clipped to ``--clip`` before fixed-point encoding). The
clip is chosen not to bind much, so the only differences are the rare clipped update and the
stochastic rounding to the ring's fixed point. Writes ``benchmarks/results/secagg_accuracy.json``
with both runs' final test accuracy and the accuracy per round. ``--keep DIR`` keeps the run
folders; a run left out of ``--runs`` is read from ``DIR`` (so the two runs can go in parallel
processes and be merged afterwards).

    python benchmarks/secagg_accuracy.py --rounds 30 --clip 20   (from the project root)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import fedguard
from fedguard.experiment import config

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "examples" / "medical_imaging" / "experiment.toml"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "secagg_accuracy.json"


def _read(overrides: list[str], out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "overrides": overrides,
        "status": summary["status"],
        "test_accuracy": summary["test_accuracy"],
        "accuracy_per_round": [r["test_accuracy"] for r in rows],
        "aborted_rounds": sum(1 for r in rows if "secure_aggregation_aborted" in r),
        "seconds": sum(r["seconds"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clip", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", type=Path, default=Path("runs") / "secagg_accuracy")
    parser.add_argument(
        "--runs", nargs="*", choices=["plain", "secure"], default=["plain", "secure"]
    )
    args = parser.parse_args()
    logging.getLogger("fedguard").setLevel(logging.ERROR)
    common = [f"experiment.rounds={args.rounds}"]  # data.path is relative: run from the root
    secure = [
        "secure_aggregation.enabled=true",
        'secure_aggregation.mode="secagg+"',
        f"secure_aggregation.clip_norm={args.clip}",
    ]
    overrides = {"plain": common, "secure": common + secure}
    for name in args.runs:
        fedguard.run(config.load(EXPERIMENT, overrides[name]), out=args.keep / name, progress=False)
    plain, masked = (_read(overrides[name], args.keep / name) for name in ("plain", "secure"))
    result = {
        "experiment": str(EXPERIMENT.relative_to(ROOT)),
        "rounds": args.rounds,
        "clip_norm": args.clip,
        "plain": plain,
        "secure_aggregation": masked,
        "accuracy_difference_points": 100 * (masked["test_accuracy"] - plain["test_accuracy"]),
    }
    print(json.dumps({k: result[k] for k in ("rounds", "accuracy_difference_points")}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
