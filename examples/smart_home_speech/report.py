"""Make the results table of the smart-home speech example (run from the project root).

For each seed: federated training (PyTorch and Keras configs), each household training alone,
centralized training on the pooled recordings, and leave-one-household-out: federated training
on five households, tested on every recording of the sixth (a new home's voice). All numbers are
final-round test accuracies. The table goes into this folder's README between the RESULTS
markers, the raw numbers into results.json.

Every finished setting is saved to results.json at once and skipped when the script runs again
(``--fresh`` starts over), so the report can be made in pieces:

    python examples/smart_home_speech/report.py [--seeds 0 1 2] [--loo-seeds 0] [--loo-rounds 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

import fedguard
from fedguard.client import evaluation, training
from fedguard.client.app import local_training_from
from fedguard.data import registry
from fedguard.data.dataset import ArrayDataset, DatasetSplits, FederatedDataset
from fedguard.experiment import config as config_mod
from fedguard.experiment import federation
from fedguard.experiment.assembly import Experiment, client_training_config

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "experiment.toml"
KERAS_CONFIG = HERE / "experiment_keras.toml"
CENTRAL_EPOCHS = 15
ALONE_EPOCHS = 20  # a household fits its own ~900 recordings well before this
RESULTS = HERE / "results.json"


def _run(config: Path, folder: Path, overrides: list[str], **kwargs) -> dict:
    shutil.rmtree(folder, ignore_errors=True)  # the report always starts its runs afresh
    return fedguard.run(config, out=folder, overrides=overrides, progress=False, **kwargs)


def _load(seed: int) -> DatasetSplits:
    cfg = config_mod.load(CONFIG)
    splits = registry.load_dataset(
        "fsdd",
        path=cfg.data.path,
        seed=seed,
        test_fraction=0.2,
        augment_copies=cfg.data.augment_copies,
        audio=federation.audio_settings(cfg.data),
    )
    assert isinstance(splits, DatasetSplits)  # the FSDD loader's splits: train, test, households
    return splits


def leave_one_out_data(splits: DatasetSplits, held_out: str) -> FederatedDataset:
    """Five households train; every original recording of the sixth is the test set."""
    train = splits.train
    augmented = splits.info.get("augmented_train", 0)
    # the FSDD loader's training set is held in memory, with a household per recording
    assert isinstance(train, ArrayDataset) and isinstance(augmented, int)
    assert train.groups is not None and splits.test.groups is not None
    original = len(train) - augmented
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
    exp.model.set_flat(exp.initial_params)
    # the example's local settings, as its clients receive them, for ``epochs`` epochs
    cfg = dataclasses.replace(local_training_from(client_training_config(exp.cfg)), epochs=epochs)
    torch.manual_seed(seed)
    training.train(exp.model, x, y, cfg, generator=torch.Generator().manual_seed(seed))
    return evaluation.evaluate(exp.model, exp.fed.eval_x, exp.fed.eval_y).accuracy


def _save(results: dict[str, dict]) -> None:
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


PARTS = ("torch", "keras", "alone", "loo")  # federated (torch), (keras), alone + centralized, LOO


def run_seed(
    seed: int,
    out: Path,
    loo: bool,
    loo_rounds: int,
    results: dict[str, dict],
    parts: tuple[str, ...] = PARTS,
) -> None:
    """Fill ``results[str(seed)]`` with every setting of ``parts`` still missing, saving after
    each one."""
    seed_opt = [f"experiment.seed={seed}"]
    res = results.setdefault(str(seed), {})
    for name, config, part in (
        ("federated (torch)", CONFIG, "torch"),
        ("federated (keras)", KERAS_CONFIG, "keras"),
    ):
        if name in res or part not in parts:
            continue
        s = _run(config, out / f"{config.stem}_seed{seed}", seed_opt)
        res[name] = {
            "accuracy": s["test_accuracy"],
            "by_household": s["accuracy_by_group"],
            "seconds": s["seconds"],
        }
        _save(results)
        print(f"seed {seed} {name}: {s['test_accuracy']:.4f} in {s['seconds']:.0f} s", flush=True)
    alone_row, central_row = "each household alone (mean)", "centralized"
    if "alone" in parts and (alone_row not in res or central_row not in res):
        exp = Experiment(config_mod.load(CONFIG, seed_opt))
        alone = {
            name: _alone(exp, d.train_x, d.train_y, ALONE_EPOCHS, seed)
            for name, d in zip(exp.fed.client_names, exp.fed.clients.values(), strict=True)
        }
        res[alone_row] = {"accuracy": statistics.fmean(alone.values()), "by_household": alone}
        pooled_x = torch.cat([d.train_x for d in exp.fed.clients.values()])
        pooled_y = torch.cat([d.train_y for d in exp.fed.clients.values()])
        res[central_row] = {"accuracy": _alone(exp, pooled_x, pooled_y, CENTRAL_EPOCHS, seed)}
        _save(results)
        print(
            f"seed {seed} alone {res[alone_row]['accuracy']:.4f} "
            f"central {res[central_row]['accuracy']:.4f}",
            flush=True,
        )
    loo_row = "leave-one-household-out (mean)"
    if not loo or loo_row in res or "loo" not in parts:
        return
    splits = _load(seed)
    left_out = res.setdefault("leave-one-household-out (partial)", {})
    households = splits.train.groups
    assert households is not None  # the FSDD loader names each recording's household
    for speaker in sorted(set(households.astype(str))):
        if speaker in left_out:
            continue
        data = leave_one_out_data(splits, speaker)
        s = _run(
            CONFIG,
            out / f"loo_{speaker}_seed{seed}",
            [*seed_opt, "data.num_clients=5", f"experiment.rounds={loo_rounds}"],
            data_fn=lambda data=data: data,
        )
        left_out[speaker] = s["test_accuracy"]
        _save(results)
        print(f"seed {seed} leave out {speaker}: {left_out[speaker]:.4f}", flush=True)
    res[loo_row] = {
        "accuracy": statistics.fmean(left_out.values()),
        "by_household": left_out,
        "rounds": loo_rounds,
    }
    del res["leave-one-household-out (partial)"]
    _save(results)


ROWS = (
    "federated (torch)",
    "federated (keras)",
    "each household alone (mean)",
    "centralized",
    "leave-one-household-out (mean)",
)


def tables(per_seed: dict[str, dict]) -> str:
    """The README's tables from whatever settings have finished, with the seeds behind each."""
    lines = [
        "| setting | test accuracy (median of seeds) | per seed |",
        "|---|---|---|",
    ]
    for row in ROWS:
        seeds = [s for s in per_seed if row in per_seed[s]]
        if not seeds:
            continue
        accs = [per_seed[s][row]["accuracy"] for s in seeds]
        per = ", ".join(f"{a:.4f} (seed {s})" for s, a in zip(seeds, accs, strict=True))
        lines.append(f"| {row} | {statistics.median(accs):.4f} | {per} |")
    households = sorted(
        {h for res in per_seed.values() for h in res.get(ROWS[0], {}).get("by_household", {})}
    )
    lines += [
        "",
        "Per household (median of seeds): the federated model on that voice's test takes, the "
        "household alone on all test takes, and leave-that-household-out on all its recordings "
        "(a new home).",
        "",
        "| household | federated (torch) | alone | left out |",
        "|---|---|---|---|",
    ]
    for h in households:
        cells = []
        for row in (ROWS[0], ROWS[2], ROWS[4]):
            values = [r[row]["by_household"][h] for r in per_seed.values() if row in r]
            cells.append(f"{statistics.median(values):.4f}" if values else "-")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loo-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    parser.add_argument("--loo-rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/speech_report"))
    parser.add_argument("--fresh", action="store_true", help="forget results.json and start over")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="settings to run (all)"
    )
    args = parser.parse_args()
    results = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    loo_seeds = args.seeds if args.loo_seeds is None else args.loo_seeds
    for seed in args.seeds:
        run_seed(seed, args.out, seed in loo_seeds, args.loo_rounds, results, tuple(args.parts))
    text = tables(results)
    print(text)
    readme = HERE / "README.md"
    body = readme.read_text()
    block = f"<!-- RESULTS -->\n{text}\n<!-- /RESULTS -->"
    readme.write_text(re.sub(r"<!-- RESULTS -->.*<!-- /RESULTS -->", block, body, flags=re.S))


if __name__ == "__main__":
    main()
