"""Which defence holds against which attack: every attack x every aggregator, two tasks, 2 seeds.

Writes ``benchmarks/results/robustness.json`` (a list of rows ``{"task", "attack", "aggregator",
"test_accuracy", "backdoor_success", "seed", "seconds"}``; attack ``"none"`` is the clean run,
aggregator ``"mean"`` plain FedAvg), ``robustness.md`` (median over seeds, one table per task,
cells within 3 points of clean FedAvg in bold) and ``robustness.png`` (heatmaps).

Every run goes through the real pipeline: ``fedguard.experiment.assembly.Experiment`` builds the
federation (data poisoning), the in-process transport wrapped by the model-poisoning attack, the
round driver (reply checks) and the strategy with the robust rule; only the run folder is skipped.
20% of the clients are malicious (4 of 20), every client joins every round, ``byzantine_f = 4``.

Tasks (settings chosen so that the whole grid fits: a digits run takes about 2-5 s and a medical
run about 25-35 s on one CPU core):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, pixels / 16), a
  stratified 75/25 split (seed 0), IID over 20 clients (about 67 images each); an MLP
  64-32-10, 20 rounds of 2 local SGD epochs (lr 0.1, batch 16).
* ``medical``: the medical example (``examples/medical_imaging/experiment.toml``, PneumoniaMNIST
  28x28, Dirichlet(0.5) partition, ``image_cnn``, Adam lr 1e-3) with 20 hospitals, 16 rounds of
  1 local epoch in batches of 16, no augmentation, and server momentum 0.9 (FedAvgM) on top of
  every rule. Why: with 8 rounds of 3 epochs (batch 32) and no momentum, even clean FedAvg
  predicted one class (50%) for its first 5 rounds and each run's final accuracy was a coin flip
  between chance and about 85%, so the table measured luck more than the defences. Here clean
  FedAvg leaves chance by round 3 and holds about 83-85% from round 7 on.

Attacks (``fedguard.simulation.attack``; omniscient ones read the round's honest updates):
sign flipping ``-4 u`` (the attackers' mass cancels the honest mean), boosting ``10 u``, Gaussian
``N(0, 1)`` per coordinate, ALIE with Baruch et al.'s z, IPM with epsilon 0.5 (small: the regime
that breaks Krum), min-max and min-sum along ``-sigma``, label flipping ``y -> 9 - y`` (``1 - y``
for the X-rays), a backdoor (a 2x2 (digits) or 3x3 (X-rays) square of the brightest pixel value in
the bottom-right corner on half of each attacker's images, target label 0).
Centered clipping's radius and norm bounding's bound are about the median honest update norm of a
clean run of the task (0.4 for digits, 0.7 for the X-rays); centered clipping runs one iteration.
Columns ``rule+bucketing`` run the rule on the means of 10 random pairs of updates
(``server.bucket_size = 2``), for the rules whose condition still holds with f = 4 on 10 inputs.

Usage::

    python benchmarks/robustness.py --task digits --jobs 2
    python benchmarks/robustness.py --task medical --jobs 14
    python benchmarks/robustness.py --task medical --seeds 0 --attacks none sign_flip \
        --aggregators mean krum          # a subset; rows already in the JSON are skipped
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from digits_task import digits_data, mlp

from fedguard.algorithms import attacks, robust

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
TASKS = ("digits", "medical")
# free riders and noisy clients are low-value clients, not attacks (see benchmarks/contribution.py)
ATTACKS = ("none", *(a.value for a in attacks.Attack if a not in attacks.LOW_VALUE))
# Rules that also run on bucket means (``server.bucket_size = BUCKET_SIZE``; named "rule+bucketing"):
# those whose condition still holds for f = 4 with 20 / 2 = 10 bucket means.
BUCKET_SIZE = 2
BUCKETED = ("median", "trimmed_mean", "geometric_median", "centered_clipping")
AGGREGATORS = (
    "mean",
    *(r.value for r in robust.RobustAggregator),
    *(f"{r}+bucketing" for r in BUCKETED),
)
CLIENTS, BYZANTINE_F, FRACTION = 20, 4, 0.2
ATTACK_PARAMETERS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 4.0},
    "boost": {"factor": 10.0},
    "gaussian": {"std": 1.0},
    "ipm": {"epsilon": 0.5},
    "min_max": {"perturbation": "std"},
    "min_sum": {"perturbation": "std"},
    "backdoor": {"target_label": 0, "poisoned_fraction": 0.5},
}
TRIGGER = {"digits": 2, "medical": 3}
HONEST_NORM = {"digits": 0.4, "medical": 0.7}  # radius / bound of the norm-based rules
ROUNDS = {"digits": 20, "medical": 16}
STRATEGY = {"digits": "fedavg", "medical": "fedavgm"}  # server momentum 0.9 on the X-rays
NEAR = 0.03  # "within 3 points of clean FedAvg"


def task_config(task: str, attack: str, aggregator: str, seed: int, data_root: Path) -> dict:
    """The experiment tables of one run."""
    if task == "digits":
        cfg: dict[str, Any] = {
            "data": {"dataset": "digits", "partition": "iid"},
            "model": {"name": "mlp"},
            "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 2, "batch_size": 16},
        }
    else:
        import tomllib

        cfg = tomllib.loads((ROOT / "examples" / "medical_imaging" / "experiment.toml").read_text())
        cfg["data"]["path"] = str(data_root / "medmnist" / "pneumoniamnist.npz")
        cfg["client"].update({"epochs": 1, "batch_size": 16, "augment": "none"})
    cfg.setdefault("experiment", {}).update(
        {"name": f"{task}-{attack}-{aggregator}", "seed": seed, "rounds": ROUNDS[task]}
    )
    cfg["data"]["num_clients"] = CLIENTS
    server = cfg.setdefault("server", {})
    rule, _, bucketing = aggregator.partition("+")
    server.update({"strategy": STRATEGY[task], "clients_per_round": CLIENTS, "aggregator": rule})
    if rule != "mean":
        server["byzantine_f"] = BYZANTINE_F
    if bucketing:
        server["bucket_size"] = BUCKET_SIZE
    if rule == "centered_clipping":
        server["clipping_radius"] = HONEST_NORM[task]
    if rule == "norm_bounding":
        server["norm_bound"] = HONEST_NORM[task]
    cfg["evaluation"] = {"every": 0, "split": "test"}
    if attack != "none":
        cfg["attack"] = {"kind": attack, "fraction": FRACTION, **ATTACK_PARAMETERS.get(attack, {})}
        if attack == "backdoor":
            cfg["attack"]["trigger_size"] = TRIGGER[task]
    return cfg


def run_one(task: str, attack: str, aggregator: str, seed: int, data_root: str) -> dict:
    """One run through the round driver; the row of the table."""
    import torch

    from fedguard.experiment import assembly
    from fedguard.experiment.config import validate
    from fedguard.protocol.driver import RoundFailedError

    start = time.perf_counter()
    cfg = validate(task_config(task, attack, aggregator, seed, Path(data_root)))
    if task == "digits":
        exp = assembly.Experiment(cfg, model_fn=mlp, data_fn=digits_data)
    else:
        exp = assembly.Experiment(cfg)
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    failed = 0
    for round_ in range(1, cfg.experiment.rounds + 1):
        try:
            result = exp.driver.fit_round(round_, params, state)
        except RoundFailedError:
            failed += 1  # the model stays as it was, as in a run
            continue
        params, state = result.params, result.state
    with torch.no_grad():
        metrics = exp.evaluate(params)
    return {
        "task": task,
        "attack": attack,
        "aggregator": aggregator,
        "test_accuracy": metrics["test_accuracy"],
        "backdoor_success": metrics["backdoor_success"],
        "seed": seed,
        "rounds_failed": failed,
        "seconds": time.perf_counter() - start,
    }


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _key(row: dict) -> tuple:
    return row["task"], row["attack"], row["aggregator"], row["seed"]


def _save(rows: list[dict], path: Path) -> None:
    order = {name: i for i, name in enumerate(TASKS + ATTACKS + AGGREGATORS)}
    rows = sorted(
        rows,
        key=lambda r: (order[r["task"]], order[r["attack"]], order[r["aggregator"]], r["seed"]),
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def _medians(rows: list[dict], task: str) -> dict[tuple[str, str], tuple[float, float | None]]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["task"] == task:
            cells.setdefault((r["attack"], r["aggregator"]), []).append(r)
    out = {}
    for key, group in cells.items():
        asr = [r["backdoor_success"] for r in group if r["backdoor_success"] is not None]
        out[key] = (
            statistics.median(r["test_accuracy"] for r in group),
            statistics.median(asr) if asr else None,
        )
    return out


def write_markdown(rows: list[dict], path: Path) -> None:
    """One table per task: rows attack, columns aggregator, median test accuracy over seeds."""
    lines = ["# Byzantine robustness: test accuracy (%) under attack, median over seeds", ""]
    lines.append(
        f"{CLIENTS} clients, {round(FRACTION * CLIENTS)} malicious, byzantine_f = {BYZANTINE_F}; "
        "**bold**: within 3 points of the clean plain run (attack none, aggregator mean); "
        "backdoor cells add the attack success rate (%). Every rule runs under the task's server "
        "optimizer (digits: FedAvg; medical: FedAvgM, momentum 0.9). "
        "Settings: benchmarks/robustness.py."
    )
    for task in TASKS:
        cells = _medians(rows, task)
        if not cells:
            continue
        seeds = sorted({r["seed"] for r in rows if r["task"] == task})
        clean = cells.get(("none", "mean"), (None, None))[0]
        attacks_ = [a for a in ATTACKS if any(k[0] == a for k in cells)]
        aggs = [g for g in AGGREGATORS if any(k[1] == g for k in cells)]
        lines += ["", f"## {task} (seeds {', '.join(map(str, seeds))})", ""]
        lines.append("| attack | " + " | ".join(aggs) + " |")
        lines.append("|---|" + "---:|" * len(aggs))
        for a in attacks_:
            out = []
            for g in aggs:
                if (a, g) not in cells:
                    out.append("")
                    continue
                acc, asr = cells[(a, g)]
                text = f"{100 * acc:.1f}"
                if clean is not None and acc >= clean - NEAR:
                    text = f"**{text}**"
                if asr is not None:
                    text += f" ({100 * asr:.0f})"
                out.append(text)
            lines.append(f"| {a} | " + " | ".join(out) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_heatmap(rows: list[dict], path: Path) -> None:
    """Accuracy heatmaps, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        cells = _medians(rows, task)
        grid = np.full((len(ATTACKS), len(AGGREGATORS)), np.nan)
        for (a, g), (acc, _) in cells.items():
            grid[ATTACKS.index(a), AGGREGATORS.index(g)] = 100 * acc
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i in range(len(ATTACKS)):
            for j in range(len(AGGREGATORS)):
                if not np.isnan(grid[i, j]):
                    colour = "black" if grid[i, j] > 60 else "white"
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color=colour)
        ax.set_xticks(range(len(AGGREGATORS)), AGGREGATORS, rotation=45, ha="right")
        ax.set_yticks(range(len(ATTACKS)), ATTACKS)
        ax.set_title(f"{task}: test accuracy (%), median over seeds")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, action="append", help="default: both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--aggregators", nargs="+", choices=AGGREGATORS, default=list(AGGREGATORS))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="discard the rows already saved")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "robustness.json"
    rows = [] if args.fresh or not path.exists() else json.loads(path.read_text())
    done = {_key(r) for r in rows}
    todo = [
        (task, attack, agg, seed, str(args.data_root.resolve()))
        for task in args.task or TASKS
        for seed in args.seeds
        for attack in args.attacks
        for agg in args.aggregators
        if (task, attack, agg, seed) not in done
    ]
    print(f"{len(todo)} runs to do, {len(rows)} rows already saved", flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=context, initializer=_worker_init
    ) as pool:
        futures = [pool.submit(run_one, *job) for job in todo]
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row = future.result()
            rows.append(row)
            _save(rows, path)
            print(
                f"[{count}/{len(todo)}] {row['task']} {row['attack']:>10} {row['aggregator']:>17} "
                f"seed {row['seed']}: acc {row['test_accuracy']:.3f} "
                f"asr {row['backdoor_success']} ({row['seconds']:.1f} s)",
                flush=True,
            )
    _save(rows, path)
    write_markdown(rows, args.out / "robustness.md")
    write_heatmap(rows, args.out / "robustness.png")


if __name__ == "__main__":
    main()
