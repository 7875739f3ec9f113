"""Make the results table of the smart-home speech example (run from the project root).

For each seed: federated training (PyTorch and Keras configs), each household training alone,
centralized training on the pooled recordings, and leave-one-household-out: federated training
on five households, tested on every recording of the sixth (a new home's voice). All numbers are
final-round test accuracies. The table goes into this folder's README between the RESULTS
markers, the raw numbers into results.json.

    python examples/smart_home_speech/report.py [--seeds 0 1 2] [--loo-rounds 30]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

import fedguard
from fedguard.client import evaluation, training
from fedguard.data import registry
from fedguard.data.dataset import ArrayDataset, DatasetSplits, FederatedDataset
from fedguard.experiment import config as config_mod
from fedguard.experiment.runner import Experiment

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "experiment.toml"
KERAS_CONFIG = HERE / "experiment_keras.toml"
CENTRAL_EPOCHS = 15


def _run(config: Path, folder: Path, overrides: list[str], **kwargs) -> dict:
    shutil.rmtree(folder, ignore_errors=True)  # the report always starts its runs afresh
    return fedguard.run(config, out=folder, overrides=overrides, progress=False, **kwargs)


def _load(seed: int) -> DatasetSplits:
    cfg = config_mod.load(CONFIG)
    return registry.load_dataset(
        "fsdd",
        path=cfg.data.path,
        seed=seed,
        test_fraction=0.2,
        augment_copies=cfg.data.augment_copies,
    )


def leave_one_out_data(splits: DatasetSplits, held_out: str) -> FederatedDataset:
    """Five households train; every original recording of the sixth is the test set."""
    train = splits.train
    original = len(train) - int(splits.info.get("augmented_train", 0))
    groups = train.groups.astype(str)
    clients = {
        str(g): train.subset(np.flatnonzero(groups == g))
        for g in sorted(set(groups))
        if g != held_out
    }
    own_train = np.flatnonzero(groups[:original] == held_out)
    own_test = np.flatnonzero(splits.test.groups.astype(str) == held_out)
    test = ArrayDataset(
        np.concatenate([train.x[own_train], splits.test.x[own_test]]),
        np.concatenate([train.y[own_train], splits.test.y[own_test]]),
    )
    return FederatedDataset(clients, test, splits.num_classes)


def _alone(exp: Experiment, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    """Test accuracy of the CNN trained on (x, y) only, with the example's local settings."""
    c = exp.cfg.client
    exp.model.set_flat(exp.initial_params)
    cfg = training.LocalTraining(
        optimizer=training.LocalOptimizer(c.optimizer),
        lr=c.lr,
        epochs=epochs,
        batch_size=c.batch_size,
        augment=c.augment,
    )
    torch.manual_seed(seed)
    training.train(exp.model, x, y, cfg, generator=torch.Generator().manual_seed(seed))
    return evaluation.evaluate(exp.model, exp.fed.eval_x, exp.fed.eval_y).accuracy


def run_seed(seed: int, out: Path, loo_rounds: int) -> dict:
    seed_opt = [f"experiment.seed={seed}"]
    res: dict = {}
    for name, config in (("federated (torch)", CONFIG), ("federated (keras)", KERAS_CONFIG)):
        s = _run(config, out / f"{config.stem}_seed{seed}", seed_opt)
        res[name] = {
            "accuracy": s["test_accuracy"],
            "by_household": s["accuracy_by_group"],
            "seconds": s["seconds"],
        }
        print(f"seed {seed} {name}: {s['test_accuracy']:.4f} in {s['seconds']:.0f} s", flush=True)
    exp = Experiment(config_mod.load(CONFIG, seed_opt))
    epochs = exp.cfg.experiment.rounds * exp.cfg.client.epochs
    alone = {
        name: _alone(exp, d.train_x, d.train_y, epochs, seed)
        for name, d in zip(exp.fed.client_names, exp.fed.clients.values(), strict=True)
    }
    res["each household alone (mean)"] = {
        "accuracy": statistics.fmean(alone.values()),
        "by_household": alone,
    }
    pooled_x = torch.cat([d.train_x for d in exp.fed.clients.values()])
    pooled_y = torch.cat([d.train_y for d in exp.fed.clients.values()])
    res["centralized"] = {"accuracy": _alone(exp, pooled_x, pooled_y, CENTRAL_EPOCHS, seed)}
    print(
        f"seed {seed} alone {res['each household alone (mean)']['accuracy']:.4f} "
        f"central {res['centralized']['accuracy']:.4f}",
        flush=True,
    )
    splits = _load(seed)
    loo = {}
    for speaker in sorted(set(splits.train.groups.astype(str))):
        data = leave_one_out_data(splits, speaker)
        s = _run(
            CONFIG,
            out / f"loo_{speaker}_seed{seed}",
            [*seed_opt, "data.num_clients=5", f"experiment.rounds={loo_rounds}"],
            data_fn=lambda data=data: data,
        )
        loo[speaker] = s["test_accuracy"]
        print(f"seed {seed} leave out {speaker}: {loo[speaker]:.4f}", flush=True)
    res["leave-one-household-out (mean)"] = {
        "accuracy": statistics.fmean(loo.values()),
        "by_household": loo,
    }
    return res


def tables(per_seed: dict[int, dict]) -> str:
    rows = list(next(iter(per_seed.values())))
    seeds = list(per_seed)
    lines = [
        "| setting | test accuracy (median of seeds) | per seed |",
        "|---|---|---|",
    ]
    for row in rows:
        accs = [per_seed[s][row]["accuracy"] for s in seeds]
        lines.append(
            f"| {row} | {statistics.median(accs):.4f} | {', '.join(f'{a:.4f}' for a in accs)} |"
        )
    households = sorted(per_seed[seeds[0]]["federated (torch)"]["by_household"])
    lines += [
        "",
        "Per household (median of seeds): federated model on that voice's test takes, the "
        "household alone on all test takes, and leave-that-household-out on all its recordings.",
        "",
        "| household | federated (torch) | alone | left out |",
        "|---|---|---|---|",
    ]
    for h in households:
        cells = [
            statistics.median(per_seed[s][row]["by_household"][h] for s in seeds)
            for row in (
                "federated (torch)",
                "each household alone (mean)",
                "leave-one-household-out (mean)",
            )
        ]
        lines.append(f"| {h} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loo-rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/speech_report"))
    args = parser.parse_args()
    per_seed = {seed: run_seed(seed, args.out, args.loo_rounds) for seed in args.seeds}
    text = tables(per_seed)
    print(text)
    (HERE / "results.json").write_text(json.dumps(per_seed, indent=2) + "\n")
    readme = HERE / "README.md"
    body = readme.read_text()
    block = f"<!-- RESULTS -->\n{text}\n<!-- /RESULTS -->"
    readme.write_text(re.sub(r"<!-- RESULTS -->.*<!-- /RESULTS -->", block, body, flags=re.S))


if __name__ == "__main__":
    main()
