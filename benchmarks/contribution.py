"""How close the cheap contribution scores come to exact Shapley values, and what they cost.

Two stages. **Record**: the task is trained and every round's game is evaluated completely once
(all 2^8 = 256 coalitions, each a sub-model through the run's own aggregation and optimizer
step); the games go to ``benchmarks/results/contribution_games.json`` (per round: the ids,
``values[mask]``, the seconds per evaluation, the cosine scores and the round's own seconds).
**Replay** (``--replay`` skips the recording): every method reads the recorded values, so any
GTG-Shapley configuration is scored on the same rounds at no training cost; ``evaluations``
count the coalitions a method asked for, and ``seconds`` are those evaluations times the round's
measured seconds per evaluation (what it would have spent alone; cosine is timed as it ran).

Writes ``benchmarks/results/contribution.json``: ``{"rows": [{"task", "seed", "method",
"scope", "pearson", "spearman", "evaluations", "exact_evaluations", "seconds",
"round_seconds", "seconds_vs_round", ...}], "frontier": [...]}`` for ``method`` in gtg_shapley,
leave_one_out and cosine and ``scope`` ``"round"`` (the correlation of one round's scores with
that round's exact Shapley values, the mean over the rounds the method scored: a round
truncated between rounds has no correlation and is counted in ``rounds_skipped``) or
``"cumulative"`` (each client's scores summed over the run, against its summed exact Shapley
values). GTG-Shapley rows name their configuration (``config``, ``max_evaluations``, the
tolerances, ``min_cycles``, ``window``) and average ``draws`` sampling streams (the first is the
run's own; ``pearson_worst_draw`` and ``spearman_worst_draw`` the worst of them);
``evaluations_late`` is the mean over the second half of the rounds. ``frontier``: per
configuration, the mean evaluations per round against the worst seed's correlations, cheapest
first, and whether the goal (Pearson >= 0.95 and Spearman >= 0.9 per round) is met.

Task ``medical``: the medical example (``examples/medical_imaging/experiment.toml``:
PneumoniaMNIST 28x28, 10 hospitals of a Dirichlet(0.5) partition, ``image_cnn``, Adam lr 1e-3)
with 8 hospitals sampled per round, one local epoch in batches of 32 without augmentation,
``ROUNDS`` rounds, FedAvg. The utility of a coalition is its sub-model's negative loss on the
data set's validation split, as in a run with ``[contribution]``. ``round_seconds`` is the
round's own time (sampling, local training, aggregation) without any scoring.

Usage::

    python benchmarks/contribution.py                    # record seeds 0 1 2, 12 rounds; replay
    python benchmarks/contribution.py --seeds 0          # what the committed results hold
    python benchmarks/contribution.py --replay           # re-score the recorded games only
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
ROUNDS = 12
PER_ROUND = 8
METHODS = ("gtg_shapley", "leave_one_out", "cosine")
BUDGETS = (9, 12, 16, 20, 26, 32, 40, 48, 64, 96, 128)
DRAWS = 5  # GTG-Shapley's sampling streams replayed per setting
SETTING_FIELDS = (
    "config",
    "max_evaluations",
    "convergence_tolerance",
    "min_cycles",
    "window",
    "walk_tolerance",
    "round_tolerance",
)


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


def record_seed(seed: int, rounds: int, data_root: Path) -> dict[str, Any]:
    """One run of the task with every round's game evaluated completely: the recorded games.

    Each round: the participants' ids, ``values[mask]`` = v(coalition ``mask``) for all 2^K
    masks (bit ``i`` = the round's ``i``-th reply), the seconds per evaluation, the cosine scores
    and their seconds, and the round's own seconds without any scoring.
    """
    from fedguard.algorithms.contribution import cosine
    from fedguard.algorithms.contribution import utility as cu
    from fedguard.experiment import assembly
    from fedguard.experiment.config import validate
    from fedguard.protocol import coalitions

    cfg = validate(task_config(seed, rounds, data_root))
    exp = assembly.Experiment(cfg)
    if exp.fed.val_x is None or exp.fed.val_y is None:
        raise SystemExit("The medical data set has no validation split.")
    evaluate = assembly.negative_loss(exp.model, exp.fed.val_x, exp.fed.val_y, cfg)
    games: list[dict[str, Any]] = []
    scoring = [0.0]

    def score(round_, params, state, replies):
        start = time.perf_counter()
        k = len(replies)

        def model_of(members: frozenset[int]) -> torch.Tensor:
            chosen = [replies[i] for i in sorted(members)]
            return coalitions.sub_model(exp.strategy, state, params, chosen, round_=round_)

        def value(members: frozenset[int]) -> float:
            return evaluate(params if not members else model_of(members))

        full = cu.Utility(value, k)
        values = [full(_members(mask)) for mask in range(1 << k)]
        spent = full.cost()
        t0 = time.perf_counter()
        step = model_of(frozenset(range(k))) - params
        cos = cosine.cosine_to_aggregate(torch.stack([r.update for r in replies]), step).tolist()
        games.append(
            {
                "round": round_,
                "ids": [r.client_id for r in replies],
                "values": values,
                "per_eval": spent.seconds / spent.evaluations,
                "cosine": cos,
                "cosine_seconds": time.perf_counter() - t0,
            }
        )
        scoring[0] += time.perf_counter() - start
        return replies, {}

    exp.driver.before_aggregate = score
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    for round_ in range(1, rounds + 1):
        scoring[0] = 0.0
        t0 = time.perf_counter()
        result = exp.driver.fit_round(round_, params, state)
        games[-1]["round_seconds"] = time.perf_counter() - t0 - scoring[0]
        params, state = result.params, result.state
        print(
            f"seed {seed} round {round_}: {games[-1]['round_seconds']:.1f} s training, "
            f"{scoring[0]:.1f} s scoring",
            flush=True,
        )
    return {"task": "medical", "seed": seed, "rounds": games}


@dataclass(frozen=True)
class Setting:
    """One GTG-Shapley configuration replayed on the recorded games."""

    name: str
    config: Any  # gtg.GtgConfig

    def fields(self) -> dict[str, Any]:
        c = self.config
        return {
            "config": self.name,
            "max_evaluations": c.max_evaluations,
            "convergence_tolerance": c.convergence_tolerance,
            "min_cycles": c.min_cycles,
            "window": c.window,
            "walk_tolerance": c.walk_tolerance,
            "round_tolerance": c.round_tolerance,
        }


def settings() -> list[Setting]:
    """The run's default GTG-Shapley configuration, the paper's authors' published settings and
    a sweep of evaluation budgets and tolerances around them."""
    from fedguard.algorithms.contribution import gtg
    from fedguard.experiment.config_sections import ContributionSection

    section = ContributionSection(method="gtg_shapley")
    default = gtg.GtgConfig(
        round_tolerance=section.gtg_round_tolerance,
        walk_tolerance=section.gtg_walk_tolerance,
        convergence_tolerance=section.gtg_convergence_tolerance,
        max_cycles=section.gtg_max_cycles,
        max_evaluations=section.gtg_max_evaluations,
    )
    out = [Setting("default", default)]
    # The authors' code: convergence 0.05 over the last 10 permutations after at least
    # max(30, K) permutations; walk and round truncation at 1e-3 of the utility.
    out.append(
        Setting(
            "authors",
            gtg.GtgConfig(
                round_tolerance=1e-3,
                walk_tolerance=1e-3,
                convergence_tolerance=0.05,
                min_cycles=max(30 // PER_ROUND + (30 % PER_ROUND > 0), 1),
            ),
        )
    )
    out.append(Setting("convergence 0.02", replace(default, convergence_tolerance=0.02)))
    for tol in (0.05, 0.1, 0.2):
        out.append(Setting(f"convergence {tol}", replace(default, convergence_tolerance=tol)))
        for window in (5, 10):
            out.append(
                Setting(
                    f"convergence {tol} window {window}",
                    replace(default, convergence_tolerance=tol, min_cycles=1, window=window),
                )
            )
    for budget in BUDGETS:
        out.append(Setting(f"budget {budget}", replace(default, max_evaluations=budget)))
    for walk in (1e-3, 3e-3, 1e-2):
        for budget in (26, 64):
            out.append(
                Setting(
                    f"budget {budget} walk {walk:g}",
                    replace(default, max_evaluations=budget, walk_tolerance=walk),
                )
            )
    for rt in (1e-3, 3e-3, 1e-2):
        out.append(
            Setting(
                f"budget 26 round {rt:g}", replace(default, max_evaluations=26, round_tolerance=rt)
            )
        )
    return out


def replay(
    task: dict[str, Any], setting: Setting | None, method: str, draws: int
) -> list[dict[str, Any]]:
    """The rows of one recorded run for one method (GTG-Shapley: one ``setting``, its scores
    averaged over ``draws`` sampling streams, the first being the run's own)."""
    from fedguard.algorithms import seeding
    from fedguard.algorithms.contribution import gtg, shapley
    from fedguard.algorithms.contribution import leave_one_out as loo
    from fedguard.algorithms.contribution import utility as cu
    from fedguard.experiment import contribution

    seed = task["seed"]
    games = task["rounds"]
    exact_values = []
    for g in games:
        values = g["values"]
        exact_values.append(
            list(
                shapley.exact(
                    cu.Utility(functools.partial(_looked_up, values), len(g["ids"]))
                ).values
            )
        )
    per_draw: list[dict[str, Any]] = []
    for draw in range(draws if method == "gtg_shapley" else 1):
        scores, evaluations, skipped = [], [], 0
        for g in games:
            game = cu.Utility(functools.partial(_looked_up, g["values"]), len(g["ids"]))
            if method == "gtg_shapley":
                assert setting is not None
                estimate = gtg.shapley(
                    game,
                    generator=seeding.generator(seed, g["round"], contribution.GTG_STREAM + draw),
                    config=setting.config,
                )
                skipped += estimate.skipped
                scores.append(list(estimate.values))
                evaluations.append(estimate.evaluations)
            elif method == "leave_one_out":
                left = loo.leave_one_out(game)
                scores.append(list(left.values))
                evaluations.append(left.evaluations)
            else:
                scores.append(list(g["cosine"]))
                evaluations.append(0)
        per_draw.append(_measure(games, scores, exact_values, evaluations, skipped))
    exact_evaluations = statistics.fmean(1 << len(g["ids"]) for g in games)
    seconds = [
        g["cosine_seconds"] if method == "cosine" else 0.0 for g in games
    ]  # per round; utility-based methods: their evaluations times the round's seconds each
    round_seconds = statistics.fmean(g["round_seconds"] for g in games)
    rows = []
    for scope in ("round", "cumulative"):
        pearsons = [d[scope][0] for d in per_draw]
        spearmans = [d[scope][1] for d in per_draw]
        evals = statistics.fmean(d["evaluations"] for d in per_draw)
        if method == "cosine":
            secs = statistics.fmean(seconds)
        else:
            secs = statistics.fmean(d["seconds_per_round"] for d in per_draw)
        row = {
            "task": task["task"],
            "seed": seed,
            "method": method,
            "scope": scope,
            "pearson": statistics.fmean(pearsons),
            "spearman": statistics.fmean(spearmans),
            "evaluations": evals,
            "exact_evaluations": exact_evaluations,
            "seconds": secs,
            "round_seconds": round_seconds,
            "seconds_vs_round": secs / round_seconds,
            "exact_seconds": statistics.fmean((1 << len(g["ids"])) * g["per_eval"] for g in games),
            "rounds": len(games),
        }
        if method == "gtg_shapley" and setting is not None:
            row.update(setting.fields())
            row["draws"] = len(per_draw)
            row["pearson_worst_draw"] = min(pearsons)
            row["spearman_worst_draw"] = min(spearmans)
            row["rounds_skipped"] = statistics.fmean(d["skipped"] for d in per_draw)
            row["evaluations_late"] = statistics.fmean(d["evaluations_late"] for d in per_draw)
        rows.append(row)
    return rows


def _measure(
    games: list[dict[str, Any]],
    scores: list[list[float]],
    exact_values: list[list[float]],
    evaluations: list[int],
    skipped: int,
) -> dict[str, Any]:
    """Correlations per round (mean over the rounds the method scored: a round truncated
    between rounds has all-zero scores and no correlation) and cumulative; the mean cost."""
    per_round = [
        correlations(s, e) for s, e in zip(scores, exact_values, strict=True) if max(s) != min(s)
    ]
    cumulative: dict[int, float] = {}
    exact_cumulative: dict[int, float] = {}
    for g, s, e in zip(games, scores, exact_values, strict=True):
        for cid, a, b in zip(g["ids"], s, e, strict=True):
            cumulative[cid] = cumulative.get(cid, 0.0) + a
            exact_cumulative[cid] = exact_cumulative.get(cid, 0.0) + b
    clients = sorted(cumulative)
    late = len(games) // 2
    return {
        "round": (
            float(np.mean([p for p, _ in per_round])) if per_round else float("nan"),
            float(np.mean([q for _, q in per_round])) if per_round else float("nan"),
        ),
        "cumulative": correlations(
            [cumulative[c] for c in clients], [exact_cumulative[c] for c in clients]
        ),
        "evaluations": statistics.fmean(evaluations),
        "evaluations_late": statistics.fmean(evaluations[late:]),
        "seconds_per_round": statistics.fmean(
            n * g["per_eval"] for n, g in zip(evaluations, games, strict=True)
        ),
        "skipped": skipped,
    }


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per GTG-Shapley setting: mean evaluations per round against the worst seed's mean
    per-round and cumulative correlations, cheapest first; ``meets_goal`` is Pearson >= 0.95 and
    Spearman >= 0.9 per round on every seed, and ``within_10_percent`` its cost goal."""
    out = []
    names = dict.fromkeys(r["config"] for r in rows if r["method"] == "gtg_shapley")
    for name in names:
        mine = [r for r in rows if r.get("config") == name]
        per_round = [r for r in mine if r["scope"] == "round"]
        cumulative = [r for r in mine if r["scope"] == "cumulative"]
        evaluations = statistics.fmean(r["evaluations"] for r in per_round)
        exact = statistics.fmean(r["exact_evaluations"] for r in per_round)
        entry = {
            **{k: per_round[0][k] for k in SETTING_FIELDS},
            "evaluations": evaluations,
            "share_of_exact": evaluations / exact,
            "evaluations_late": statistics.fmean(r["evaluations_late"] for r in per_round),
            "pearson_round_worst_seed": min(r["pearson"] for r in per_round),
            "spearman_round_worst_seed": min(r["spearman"] for r in per_round),
            "pearson_round_mean": statistics.fmean(r["pearson"] for r in per_round),
            "spearman_round_mean": statistics.fmean(r["spearman"] for r in per_round),
            "pearson_cumulative_worst_seed": min(r["pearson"] for r in cumulative),
            "spearman_cumulative_worst_seed": min(r["spearman"] for r in cumulative),
            "seconds_vs_round": statistics.fmean(r["seconds_vs_round"] for r in per_round),
            "rounds_skipped": statistics.fmean(r["rounds_skipped"] for r in per_round),
        }
        entry["meets_goal"] = (
            entry["pearson_round_worst_seed"] >= 0.95 and entry["spearman_round_worst_seed"] >= 0.9
        )
        entry["within_10_percent"] = entry["share_of_exact"] <= 0.1
        out.append(entry)
    return sorted(out, key=lambda e: e["evaluations"])


def _mask(members: frozenset[int]) -> int:
    return sum(1 << i for i in members)


def _looked_up(values: list[float], members: frozenset[int]) -> float:
    """A recorded game's utility of a coalition (``values`` indexed by its member bit mask)."""
    return values[_mask(members)]


def _members(mask: int) -> frozenset[int]:
    return frozenset(i for i in range(mask.bit_length()) if mask >> i & 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--games", type=Path, default=RESULTS / "contribution_games.json")
    parser.add_argument(
        "--replay", action="store_true", help="score the recorded games again without training"
    )
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--out", type=Path, default=RESULTS / "contribution.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.replay:
        recorded = json.loads(args.games.read_text())
    else:
        recorded = {"task": "medical", "rounds": args.rounds, "per_round": PER_ROUND, "runs": []}
        for seed in args.seeds:
            recorded["runs"].append(record_seed(seed, args.rounds, args.data))
            args.games.parent.mkdir(parents=True, exist_ok=True)
            args.games.write_text(json.dumps(recorded) + "\n")
    rows: list[dict[str, Any]] = []
    for task in recorded["runs"]:
        for setting in settings():
            rows.extend(replay(task, setting, "gtg_shapley", args.draws))
        for method in METHODS[1:]:
            rows.extend(replay(task, None, method, 1))
    out = {
        "task": "medical",
        "rounds": recorded["rounds"],
        "clients_per_round": recorded["per_round"],
        "draws": args.draws,
        "rows": rows,
        "frontier": frontier(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for e in out["frontier"]:
        print(
            f"{e['config']:34s} evals {e['evaluations']:6.1f} ({e['share_of_exact']:.3f}) "
            f"pearson {e['pearson_round_worst_seed']:.3f} spearman "
            f"{e['spearman_round_worst_seed']:.3f} cum {e['pearson_cumulative_worst_seed']:.3f}/"
            f"{e['spearman_cumulative_worst_seed']:.3f} x round {e['seconds_vs_round']:.2f} "
            f"{'GOAL' if e['meets_goal'] else ''}"
        )
    for row in rows:
        if row["method"] != "gtg_shapley":
            print(
                f"{row['seed']} {row['method']:14s} {row['scope']:10s} "
                f"pearson {row['pearson']:.3f} spearman {row['spearman']:.3f} "
                f"evals {row['evaluations']:.0f}/{row['exact_evaluations']:.0f}"
            )


if __name__ == "__main__":
    main()
