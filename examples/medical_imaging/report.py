"""Make the results table of the medical-imaging example (run from the project root).

For each seed it runs: federated training with the PyTorch model, the same config with the Keras
model, every hospital training alone on its own images, and centralized training on the pooled
images. All are the same CNN, evaluated on the final round/epoch (never the best one) on the
held-out test split. The table goes into this folder's README between the RESULTS markers, the
raw numbers into results.json.

    python examples/medical_imaging/report.py [--seeds 0 1 2] [--split test]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import time
from pathlib import Path

import torch

import fedguard
from fedguard.client import training
from fedguard.client.app import local_training_from
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment, central_metrics, client_training_config

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "experiment.toml"


def _isolated(exp: Experiment, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> dict:
    """Train a fresh copy of the experiment's model on (x, y) alone, evaluate on the test split."""
    exp.model.set_flat(exp.initial_params)
    # the example's local settings, as its clients receive them, for ``epochs`` epochs
    cfg = dataclasses.replace(local_training_from(client_training_config(exp.cfg)), epochs=epochs)
    torch.manual_seed(seed)
    training.train(exp.model, x, y, cfg, generator=torch.Generator().manual_seed(seed))
    return central_metrics(exp.model, exp.fed.eval_x, exp.fed.eval_y, 1024)


def run_seed(seed: int, split: str, out: Path) -> dict:
    overrides = [f"experiment.seed={seed}", f'evaluation.split="{split}"', "evaluation.every=5"]
    results: dict[str, dict] = {}
    for framework in ("torch", "keras"):
        t0 = time.perf_counter()
        folder = out / f"federated_{framework}_seed{seed}"
        shutil.rmtree(folder, ignore_errors=True)  # the report always starts its runs afresh
        s = fedguard.run(
            CONFIG,
            out=folder,
            overrides=[*overrides, f'model.framework="{framework}"'],
            progress=False,
        )
        results[f"federated ({framework})"] = {
            "accuracy": s["test_accuracy"],
            "auc": s["test_auc"],
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"seed {seed} federated {framework}: {results[f'federated ({framework})']}", flush=True
        )
    exp = Experiment(config_mod.load(CONFIG, overrides))
    epochs_total = exp.cfg.experiment.rounds * exp.cfg.client.epochs
    alone = [
        _isolated(exp, d.train_x, d.train_y, epochs_total, seed) for d in exp.fed.clients.values()
    ]
    results["each hospital alone (mean)"] = {
        "accuracy": statistics.fmean(a["test_accuracy"] for a in alone),
        "auc": statistics.fmean(a["test_auc"] for a in alone),
        "per_hospital": alone,
    }
    pooled_x = torch.cat([d.train_x for d in exp.fed.clients.values()])
    pooled_y = torch.cat([d.train_y for d in exp.fed.clients.values()])
    central = _isolated(exp, pooled_x, pooled_y, CENTRAL_EPOCHS, seed)
    results["centralized"] = {"accuracy": central["test_accuracy"], "auc": central["test_auc"]}
    print(
        f"seed {seed} alone/central: {results['each hospital alone (mean)']['accuracy']:.4f} "
        f"{central}",
        flush=True,
    )
    return results


CENTRAL_EPOCHS = 5


def table(per_seed: dict[int, dict]) -> str:
    rows = list(next(iter(per_seed.values())))
    lines = [
        "| setting | test accuracy (median) | ROC AUC (median) | accuracy per seed | AUC per seed |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        accs = [per_seed[s][row]["accuracy"] for s in per_seed]
        aucs = [per_seed[s][row]["auc"] for s in per_seed]
        lines.append(
            f"| {row} | {statistics.median(accs):.4f} | {statistics.median(aucs):.4f} | "
            f"{', '.join(f'{a:.4f}' for a in accs)} | {', '.join(f'{a:.4f}' for a in aucs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--out", type=Path, default=Path("runs/medical_report"))
    args = parser.parse_args()
    per_seed = {seed: run_seed(seed, args.split, args.out) for seed in args.seeds}
    text = table(per_seed)
    print(text)
    (HERE / f"results_{args.split}.json").write_text(json.dumps(per_seed, indent=2) + "\n")
    if args.split == "test":
        readme = HERE / "README.md"
        body = readme.read_text()
        block = f"<!-- RESULTS -->\n{text}\n<!-- /RESULTS -->"
        body = re.sub(r"<!-- RESULTS -->.*<!-- /RESULTS -->", block, body, flags=re.S)
        readme.write_text(body)


if __name__ == "__main__":
    main()
