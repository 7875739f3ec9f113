"""How close the cheap contribution scores come to exact Shapley values, and what they cost.

Writes ``benchmarks/results/contribution.json``: ``{"rows": [{"task", "seed", "method",
"scope", "pearson", "spearman", "evaluations", "exact_evaluations", "seconds",
"round_seconds"}]}`` for ``method`` in gtg_shapley, leave_one_out and cosine and ``scope``
``"round"`` (the correlation of one round's scores with that round's exact Shapley values,
the mean over the run's rounds) or ``"cumulative"`` (each client's scores summed over the run,
against its summed exact Shapley values).

Task ``medical``: the medical example (``examples/medical_imaging/experiment.toml``:
PneumoniaMNIST 28x28, 10 hospitals of a Dirichlet(0.5) partition, ``image_cnn``, Adam lr 1e-3)
with 8 hospitals sampled per round, one local epoch in batches of 32 without augmentation,
``ROUNDS`` rounds, FedAvg. The utility of a coalition is its sub-model's negative loss on the
data set's validation split (524 images), as in a run with ``[contribution]``.

Every round's game is evaluated once, completely (exact Shapley: all 2^8 = 256 coalitions, each
a sub-model through the run's own aggregation and optimizer step). GTG-Shapley (the run's
defaults) and leave-one-out then read the same memoised values: their ``evaluations`` count the
coalitions each asked for, and their ``seconds`` are those evaluations times the round's
measured mean seconds per evaluation (what they would have spent alone). Cosine is timed as it
runs. ``round_seconds`` is the round's own time (sampling, local training, aggregation) without
any scoring, the mean over rounds; ``seconds`` and ``evaluations`` are per round, the mean.

Usage::

    python benchmarks/contribution.py                 # 3 seeds
    python benchmarks/contribution.py --seeds 0 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
ROUNDS = 4
PER_ROUND = 8
METHODS = ("gtg_shapley", "leave_one_out", "cosine")


def task_config(seed: int, rounds: int, data_root: Path) -> dict[str, Any]:
    cfg = tomllib.loads((ROOT / "examples" / "medical_imaging" / "experiment.toml").read_text())
    cfg["data"]["path"] = str(data_root / "medmnist" / "pneumoniamnist.npz")
    cfg["client"].update({"epochs": 1, "batch_size": 32, "augment": "none"})
    cfg["experiment"].update({"name": "contribution", "seed": seed, "rounds": rounds})
    cfg["server"].update({"clients_per_round": PER_ROUND})
    cfg["evaluation"] = {"every": 0, "split": "test"}
    return cfg


def correlations(a: list[float], b: list[float]) -> tuple[float, float]:
    """Pearson and Spearman correlation of two score vectors (ranks: no ties expected)."""
    from scipy import stats

    pearson = float(stats.pearsonr(a, b).statistic)
    spearman = float(stats.spearmanr(a, b).statistic)
    return pearson, spearman


def run_seed(seed: int, rounds: int, data_root: Path) -> list[dict[str, Any]]:
    """One run of the task with every method scoring every round; its rows."""
    from fedguard.algorithms import seeding
    from fedguard.algorithms.contribution import cosine, gtg, shapley
    from fedguard.algorithms.contribution import leave_one_out as loo
    from fedguard.algorithms.contribution import utility as cu
    from fedguard.experiment import assembly, contribution
    from fedguard.experiment.config import validate
    from fedguard.protocol import coalitions

    cfg = validate(task_config(seed, rounds, data_root))
    exp = assembly.Experiment(cfg)
    if exp.fed.val_x is None or exp.fed.val_y is None:
        raise SystemExit("The medical data set has no validation split.")
    evaluate = assembly.negative_loss(exp.model, exp.fed.val_x, exp.fed.val_y, cfg)
    gtg_config = contribution.Tracker(
        cfg.contribution.model_copy(update={"method": "gtg_shapley"}),
        exp.strategy,
        evaluate,
        seed=seed,
    ).gtg_config
    per_round: list[dict[str, Any]] = []
    scoring = [0.0]

    def score(round_, params, state, replies):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        ids = [r.client_id for r in replies]

        def model_of(members: frozenset[int]) -> torch.Tensor:
            chosen = [replies[i] for i in sorted(members)]
            return coalitions.sub_model(exp.strategy, state, params, chosen, round_=round_)

        def value(members: frozenset[int]) -> float:
            return evaluate(params if not members else model_of(members))

        full = cu.Utility(value, len(replies))
        exact = shapley.exact(full)
        memo = {m: full(m) for m in (frozenset(s) for s in _all_subsets(len(replies)))}
        per_eval = exact.seconds / exact.evaluations
        out: dict[str, Any] = {"ids": ids, "exact": list(exact.values)}
        out["exact_evaluations"] = exact.evaluations
        out["exact_seconds"] = exact.seconds
        game = cu.Utility(memo.__getitem__, len(replies))
        estimate = gtg.shapley(
            game,
            generator=seeding.generator(seed, round_, contribution.GTG_STREAM),
            config=gtg_config,
        )
        out["gtg_shapley"] = (list(estimate.values), estimate.evaluations)
        game = cu.Utility(memo.__getitem__, len(replies))
        left = loo.leave_one_out(game)
        out["leave_one_out"] = (list(left.values), left.evaluations)
        t0 = time.perf_counter()
        step = model_of(frozenset(range(len(replies)))) - params
        cos = cosine.cosine_to_aggregate(torch.stack([r.update for r in replies]), step).tolist()
        out["cosine_seconds"] = time.perf_counter() - t0
        out["cosine"] = (cos, 0)
        out["per_eval"] = per_eval
        per_round.append(out)
        scoring[0] += time.perf_counter() - start
        return replies, {}

    exp.driver.before_aggregate = score
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    round_seconds = []
    for round_ in range(1, rounds + 1):
        scoring[0] = 0.0
        t0 = time.perf_counter()
        result = exp.driver.fit_round(round_, params, state)
        round_seconds.append(time.perf_counter() - t0 - scoring[0])
        params, state = result.params, result.state
        print(
            f"seed {seed} round {round_}: {round_seconds[-1]:.1f} s training, "
            f"{scoring[0]:.1f} s scoring",
            flush=True,
        )
    rows = []
    for method in METHODS:
        round_corr = []
        cumulative: dict[int, float] = {}
        exact_cumulative: dict[int, float] = {}
        evaluations, seconds = [], []
        for r in per_round:
            values, count = r[method]
            round_corr.append(correlations(values, r["exact"]))
            evaluations.append(count)
            seconds.append(r["cosine_seconds"] if method == "cosine" else count * r["per_eval"])
            for cid, v, e in zip(r["ids"], values, r["exact"], strict=True):
                cumulative[cid] = cumulative.get(cid, 0.0) + v
                exact_cumulative[cid] = exact_cumulative.get(cid, 0.0) + e
        clients = sorted(cumulative)
        cum = correlations([cumulative[c] for c in clients], [exact_cumulative[c] for c in clients])
        common = {
            "task": "medical",
            "seed": seed,
            "method": method,
            "evaluations": statistics.fmean(evaluations),
            "exact_evaluations": statistics.fmean(r["exact_evaluations"] for r in per_round),
            "seconds": statistics.fmean(seconds),
            "exact_seconds": statistics.fmean(r["exact_seconds"] for r in per_round),
            "round_seconds": statistics.fmean(round_seconds),
        }
        rows.append(
            {
                **common,
                "scope": "round",
                "pearson": float(np.mean([p for p, _ in round_corr])),
                "spearman": float(np.mean([s for _, s in round_corr])),
            }
        )
        rows.append({**common, "scope": "cumulative", "pearson": cum[0], "spearman": cum[1]})
    return rows


def _all_subsets(k: int) -> list[set[int]]:
    return [{i for i in range(k) if mask >> i & 1} for mask in range(1 << k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "contribution.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows.extend(run_seed(seed, args.rounds, args.data))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['seed']} {row['method']:14s} {row['scope']:10s} pearson {row['pearson']:.3f} "
            f"spearman {row['spearman']:.3f} evals {row['evaluations']:.0f}/"
            f"{row['exact_evaluations']:.0f} {row['seconds']:.2f} s (round {row['round_seconds']:.1f} s)"
        )


if __name__ == "__main__":
    main()
