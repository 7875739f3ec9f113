"""Free riders and noisy clients: are they flagged, and does leaving them out recover accuracy?

Writes ``benchmarks/results/contribution_detection.json``: ``{"runs": [...], "rows": [...]}``.

Per example (``medical``: ``examples/medical_imaging``, 10 hospitals; ``speech``:
``examples/smart_home_speech``, 6 households), every run with the example's own settings except
the number of rounds (``--rounds``; the README's table says which) and the evaluation (the test
set after the last round only):

* ``clean``: no simulated behaviour; scored with leave-one-out and never excluding anyone, so
  that it trains on exactly the data the attacked runs' honest clients train on (FSDD holds its
  validation takes 5-9 out of training whenever a run scores contributions) and so that its
  flags count the honest clients flagged without any low-value client present;
* for ``method`` in gtg_shapley and leave_one_out, the attacked run without exclusion:
  ``[attack] kind = ["free_rider", "noisy_client"]``, ``fraction = [0.2, 0.1]`` (medical: 2
  free riders and 1 noisy client of 10; speech: 1 and 1 of 6, the nearest counts to 20% and
  10%), ``label_noise`` every label shuffled (``--label-noise``);
* the attacked run with ``exclude_flagged`` once per flag rule: ``flag_rule = "score"`` with
  each method, ``flag_rule = "update"`` with ``method = "cosine"`` (the update test needs no
  evaluation, and its flags do not depend on the method), and ``flag_rule = "either"`` (a client
  flagged by either rule) with each method: a free rider sends no change, which the update test
  sees, and a noisy client sends a full-sized change that is worth little, which the score sees.

Flags: every round scored; a client is flagged after ``flag_patience`` (``--patience``) rounds in
a row with a score below ``flag_threshold = 0`` (rule ``score``) or with a suspect update (rule
``update``: norm below ``flag_min_norm_ratio = 0.01`` of the round's median). The runs without
exclusion and the clean run use ``flag_rule = "either"``, which keeps both rules' flags apart in
``summary.json`` (``flagged_by``); without exclusion the flags do not change the training, so one
run serves every rule ("either" is the union of the two). A row per (example, rule, method): the precision and recall of the
clients the rule flagged by the end of the run without exclusion against the ground truth (the
attack's ids, from ``summary.json``), the same for the run with exclusion, the clients the rule
flagged in the clean run, and the final test accuracy of the clean run, the attacked run without
exclusion and the attacked run with it; where the test set has groups (the households' speakers),
the same three on the honest clients' groups only (``honest_accuracy_*``, a mean over those
households), which is all that leaving clients out can give back: no run learns the voices of
the households whose data was withheld or mislabelled. GTG-Shapley runs with the configuration's tolerances and
``gtg_max_evaluations`` = ``--gtg-max-evaluations`` (32: about 3 permutations of 10 clients).
``--seeds`` runs the whole plan once per experiment seed (the partition and the attacked clients
follow it). A run whose folder under ``--work`` holds its summary and the same configuration is
read back instead of run again, so a stopped invocation loses only the run it was in.

Usage::

    python benchmarks/contribution_detection.py                       # both examples
    python benchmarks/contribution_detection.py --examples speech --rounds 5
    python benchmarks/contribution_detection.py --examples medical --seeds 0 1 2
    python benchmarks/contribution_detection.py --examples speech --model speech_cnn --rounds 10

``--model`` replaces the example's model by name (the speech example's configuration names the
brief's network, about ten times slower per round than the compact default ``speech_cnn``); the
rows and runs record the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
EXAMPLES = {
    "medical": ("medical_imaging", "medmnist/pneumoniamnist.npz", 10),
    "speech": ("smart_home_speech", "fsdd", 6),
}
METHODS = ("gtg_shapley", "leave_one_out")
GTG_BUDGET = 32  # GTG-Shapley's evaluations per round (contribution.gtg_max_evaluations)
BEHAVIOURS = {"kind": ["free_rider", "noisy_client"], "fraction": [0.2, 0.1]}


def example_config(
    example: str,
    rounds: int,
    data_root: Path,
    *,
    label_noise: float,
    patience: int,
    seed: int,
    model: str | None = None,
) -> dict[str, Any]:
    """The example's configuration with ``rounds`` rounds and experiment seed ``seed``, final
    evaluation only, and scores; ``model`` replaces the example's model by name."""
    folder, data, _ = EXAMPLES[example]
    cfg = tomllib.loads((ROOT / "examples" / folder / "experiment.toml").read_text())
    if model is not None:
        cfg["model"]["name"] = model
    cfg["data"]["path"] = str(data_root / data)
    cfg["experiment"]["rounds"] = rounds
    cfg["experiment"]["seed"] = seed
    cfg["evaluation"] = {"every": 0, "split": "test"}
    cfg["contribution"] = {"method": "leave_one_out", "flag_patience": patience}
    cfg["attack"] = {**BEHAVIOURS, "label_noise": label_noise}
    return cfg


def variant(
    base: dict[str, Any], name: str, method: str, rule: str, *, exclude: bool, budget: int
) -> dict[str, Any]:
    """``base`` scored with ``method``, flagging by ``rule``, with or without exclusion."""
    cfg = json.loads(json.dumps(base))
    cfg["experiment"]["name"] = name
    cfg["contribution"]["method"] = method
    cfg["contribution"]["flag_rule"] = rule
    if method == "gtg_shapley":
        cfg["contribution"]["gtg_max_evaluations"] = budget
    if exclude:
        cfg["contribution"]["exclude_flagged"] = True
    if name.endswith("clean"):
        cfg.pop("attack")
    return cfg


def precision_recall(flagged: set[int], bad: set[int]) -> tuple[float | None, float]:
    """Precision (None when nothing is flagged) and recall of ``flagged`` against ``bad``."""
    hit = len(flagged & bad)
    precision = hit / len(flagged) if flagged else None
    return precision, hit / len(bad)


RULES = ("score", "update", "either")
# (label, method, flag rule, exclude_flagged)
PLAN = (
    ("clean", "leave_one_out", "either", False),
    *((m, m, "either", False) for m in METHODS),
    *((f"{m} exclude", m, "score", True) for m in METHODS),
    ("update exclude", "cosine", "update", True),
    *((f"{m} either exclude", m, "either", True) for m in METHODS),
)


def one_run(
    example: str,
    label: str,
    base: dict[str, Any],
    work: Path,
    *,
    budget: int,
) -> dict[str, Any]:
    """One of the example's runs (``label`` from :data:`PLAN`) and what it measured."""
    import fedguard

    _, method, rule, exclude = next(p for p in PLAN if p[0] == label)
    seed = base["experiment"]["seed"]
    name = f"{example}-seed{seed}-{label.replace(' ', '-')}"
    cfg = variant(base, name, method, rule, exclude=exclude, budget=budget)
    t0 = time.perf_counter()
    folder = work / name
    asked = folder / "benchmark_config.json"
    done = folder / "summary.json"
    if asked.exists() and done.exists() and json.loads(asked.read_text()) == cfg:
        summary = json.loads(done.read_text())  # finished by an earlier, stopped invocation
    else:
        if folder.exists():  # a run stopped part-way, or one of other settings: start afresh
            shutil.rmtree(folder)
        summary = fedguard.run(cfg, out=folder, progress=False)
        asked.write_text(json.dumps(cfg))
    attack = summary.get("attack") or {}
    contribution = summary["contribution"]
    record = {
        "example": example,
        "run": label,
        "method": method,
        "flag_rule": rule,
        "exclude_flagged": exclude,
        "seed": seed,
        "rounds": base["experiment"]["rounds"],
        "model": base["model"]["name"],
        "test_accuracy": summary["test_accuracy"],
        "accuracy_by_group": summary.get("accuracy_by_group"),
        "client_names": _client_names(folder),
        "flagged": contribution["flagged"],
        "flagged_by": contribution["flagged_by"],
        "excluded": contribution["excluded"],
        "by_kind": attack.get("by_kind"),
        "num_clients": summary["num_clients"],
        "scoring_evaluations": contribution["evaluations"],
        "scoring_seconds": contribution["seconds"],
        "seconds": summary.get("seconds", time.perf_counter() - t0),
    }
    print(json.dumps(record), flush=True)
    return record


def _client_names(folder: Path) -> dict[str, str]:
    """Client id (as a JSON key) to its name (the household's speaker), from the run's
    ``partition.json``."""
    partition = json.loads((folder / "partition.json").read_text())
    return {str(c["id"]): str(c["name"]) for c in partition["clients"]}


def honest_accuracy(run: dict[str, Any], bad: set[int]) -> float | None:
    """The mean test accuracy over the groups (households) of the clients not in ``bad``: what
    leaving the low-value clients out can recover, since no run learns the voices whose data was
    held back or mislabelled. None where the test set has no groups (the X-rays)."""
    groups = run.get("accuracy_by_group")
    if not groups:
        return None
    names = [n for cid, n in run["client_names"].items() if int(cid) not in bad]
    return sum(groups[n] for n in names) / len(names)


def _flags(run: dict[str, Any], rule: str) -> list[int]:
    """The clients ``rule`` flagged in ``run`` (scored with ``flag_rule = "either"``, which
    keeps each rule's flags apart; "either" is their union)."""
    if rule == "either":
        return sorted(set(run["flagged_by"]["score"]) | set(run["flagged_by"]["update"]))
    return list(run["flagged_by"][rule])


def rows_of(
    example: str, runs: dict[str, dict[str, Any]], *, label_noise: float, patience: int, budget: int
) -> list[dict[str, Any]]:
    """One row per (rule, method) from the example's runs of one seed: the score rule with each
    method, the update rule once (its flags do not depend on the method)."""
    rows = []
    clean = runs["clean"]
    plan = [("score", m, m, f"{m} exclude") for m in METHODS]
    plan.append(("update", "any", METHODS[0], "update exclude"))
    plan += [("either", m, m, f"{m} either exclude") for m in METHODS]
    for rule, method, plain, excluded in plan:
        without, with_ = runs[plain], runs[excluded]
        truth = without["by_kind"]
        bad = {c for ids in truth.values() for c in ids}
        flagged = _flags(without, rule)
        p, r = precision_recall(set(flagged), bad)
        pe, re = precision_recall(set(with_["flagged"]), bad)
        rows.append(
            {
                "example": example,
                "flag_rule": rule,
                "method": method,
                "seed": without["seed"],
                "rounds": without["rounds"],
                "model": without["model"],
                "clients": without["num_clients"],
                "free_riders": truth["free_rider"],
                "noisy_clients": truth["noisy_client"],
                "label_noise": label_noise,
                "flag_patience": patience,
                "flag_min_norm_ratio": 0.01 if rule == "update" else None,
                "gtg_max_evaluations": budget if method == "gtg_shapley" else None,
                "flagged": flagged,
                "precision": p,
                "recall": r,
                "flagged_exclude": with_["flagged"],
                "precision_exclude": pe,
                "recall_exclude": re,
                "clean_flagged": _flags(clean, rule),
                "accuracy_clean": clean["test_accuracy"],
                "accuracy_attacked": without["test_accuracy"],
                "accuracy_exclude_flagged": with_["test_accuracy"],
                "gap_attacked": without["test_accuracy"] - clean["test_accuracy"],
                "gap_exclude_flagged": with_["test_accuracy"] - clean["test_accuracy"],
                "honest_accuracy_clean": honest_accuracy(clean, bad),
                "honest_accuracy_attacked": honest_accuracy(without, bad),
                "honest_accuracy_exclude_flagged": honest_accuracy(with_, bad),
            }
        )
    return rows


def run_example(
    example: str,
    rounds: int,
    data_root: Path,
    work: Path,
    *,
    label_noise: float,
    patience: int,
    budget: int,
    seed: int,
    model: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The example's six runs for one seed and its rows (one per rule and method)."""
    base = example_config(
        example,
        rounds,
        data_root,
        label_noise=label_noise,
        patience=patience,
        seed=seed,
        model=model,
    )
    runs = {label: one_run(example, label, base, work, budget=budget) for label, *_ in PLAN}
    rows = rows_of(example, runs, label_noise=label_noise, patience=patience, budget=budget)
    return list(runs.values()), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", nargs="+", choices=sorted(EXAMPLES), default=list(EXAMPLES))
    parser.add_argument("--rounds", type=int, default=None, help="default: 10 medical, 6 speech")
    parser.add_argument("--label-noise", type=float, default=1.0)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--gtg-max-evaluations", type=int, default=GTG_BUDGET)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--model",
        default=None,
        help="replace the examples' model by this one (e.g. speech_cnn, the compact default, "
        "for the speech example, whose configuration names the brief's slower network)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "contribution_detection")
    parser.add_argument("--out", type=Path, default=RESULTS / "contribution_detection.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"runs": [], "rows": []}
    if args.out.exists():  # other examples' and seeds' results are kept
        old = json.loads(args.out.read_text())
        out = {k: v for k, v in old.items() if k not in ("runs", "rows")}

        def kept(r: dict[str, Any]) -> bool:
            return r["example"] not in args.examples or r.get("seed", 0) not in args.seeds

        out["runs"] = [r for r in old["runs"] if kept(r)]
        out["rows"] = [r for r in old["rows"] if kept(r)]
    for example in args.examples:
        rounds = args.rounds if args.rounds is not None else EXAMPLES[example][2]
        for seed in args.seeds:
            runs, rows = run_example(
                example,
                rounds,
                args.data,
                args.work,
                label_noise=args.label_noise,
                patience=args.patience,
                budget=args.gtg_max_evaluations,
                seed=seed,
                model=args.model,
            )
            out["runs"].extend(runs)
            out["rows"].extend(rows)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
    for row in out["rows"]:
        print(
            f"{row['example']:8s} seed {row.get('seed', 0)} {row.get('flag_rule', 'score'):6s} "
            f"{row['method']:14s} precision {row['precision']} recall "
            f"{row['recall']:.2f} | accuracy clean {row['accuracy_clean']:.4f} attacked "
            f"{row['accuracy_attacked']:.4f} excluded {row['accuracy_exclude_flagged']:.4f}"
        )


if __name__ == "__main__":
    main()
