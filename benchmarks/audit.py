"""Privacy audits of the examples under each protection: what an attacker gets.

For each protection (none; record-level DP-SGD at each target epsilon; user-level central DP;
secure aggregation without DP) and seed, one example (``--task``, one entry of :data:`TASKS`) is
trained with ``--audit-canaries`` canaries:

* ``medical`` (the default): the medical-imaging example, PneumoniaMNIST over 10 hospitals;
* ``speech``: the smart-home speech example, FSDD spoken digits over 6 households, with the
  compact default model ``speech_cnn`` instead of the example's ``brief_speech_cnn`` (4M
  weights, slower to train and to invert) and without the example's perturbed copies of each
  recording (``data.augment_copies = 0``: local DP refuses them, since epsilon would cover one
  copy, not one recording; every protection trains on the same data); the attacks see log-mel
  maps ``[1, 40, 101]`` where the medical example has images;
* ``speech_brief``: the same with the example's own ``brief_speech_cnn``, whose dense layer
  on the convolution's output gives the inversion far more to work with (measured at seed 0,
  every protection).

Each run is then attacked with ``fedguard audit``'s attacks:

* ``canary``: the one-run empirical epsilon lower bound at 95% beside the accounted epsilon;
* ``update`` (local DP): the same bound for one client's round-1 update as the server sees it,
  beside that one release's epsilon (:mod:`fedguard.audit.update_canary`);
* ``membership``: offline LiRA (and the loss attack) on the final model: AUC, TPR at 1% FPR;
* ``inversion``: gradient inversion of one client's update in round 1 for each batch size and
  number of local steps, the median PSNR/SSIM over the attacked clients (``Scale.targets``, at
  most the example's).

Rows go to ``benchmarks/results/audit.json`` (``{"rows": [...]}``, the issue's schema: ``task``,
``attack``, ``protection``, ``target_epsilon``, ``accounted_epsilon``, ``seed`` and per attack
``psnr``/``ssim``/``baseline_psnr``/``batch_size``/``local_steps``, ``auc``/``tpr_at_1pct_fpr``,
``epsilon_lower_bound``/``canaries``), written after every run (a rerun replaces the rows of the
task, protections and seeds it runs and keeps the others); ``--small`` is the quick version
(3 rounds, 200 canaries, one reference model, 300 attack iterations, 2 targets) that the README
quotes; the full version is the default:

    python benchmarks/audit.py --small --seeds 0
    python benchmarks/audit.py --small --strong-canaries --seeds 0 1 2   # canary runs only
    python benchmarks/audit.py --small --update-audit --seeds 0 1 2      # one update, local DP
    python benchmarks/audit.py --small --task speech --seeds 0 --threads 1   # the speech example
    python benchmarks/audit.py --seeds 0 1 2        # hours on 2 CPU cores; a GPU helps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fedguard
from fedguard.audit import canary, canary_audit, inversion, membership, target, update_canary
from fedguard.experiment import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "audit.json"
DELTA = 1e-5


@dataclass(frozen=True)
class Task:
    """An example the benchmark audits: its ``name`` in the rows, its experiment file, the
    ``overrides`` every run of it gets (before the protection's), and those local DP adds
    (``local_dp``: a model without batch statistics, so that DP-SGD's per-example gradients
    apply)."""

    name: str
    config: Path
    overrides: tuple[str, ...]
    local_dp: tuple[str, ...]


TASKS = {
    task.name: task
    for task in (
        Task(
            "medical",
            ROOT / "examples" / "medical_imaging" / "experiment.toml",
            (),
            ('model.name="dp_image_cnn"',),
        ),
        # speech_cnn (GroupNorm without affine weights) serves every protection, local DP too.
        Task(
            "speech",
            ROOT / "examples" / "smart_home_speech" / "experiment.toml",
            ('model.name="speech_cnn"', "data.augment_copies=0"),
            (),
        ),
        # The example's own model (4M weights, a dense layer on the conv features).
        Task(
            "speech_brief",
            ROOT / "examples" / "smart_home_speech" / "experiment.toml",
            ('model.name="brief_speech_cnn"', "data.augment_copies=0"),
            (),
        ),
    )
}
# The record-level DP recipe of benchmarks/dp_tradeoff.py (full-batch DP-GD in each client, a
# GroupNorm CNN (the task's ``local_dp``), server momentum, PLD accounting).
LOCAL_DP = [
    "client.optimizer=sgd",
    "client.lr=0.5",
    "client.epochs=1",
    "client.batch_size=1000",
    "client.augment=none",
    "server.strategy=fedavgm",
    "server.server_momentum=0.9",
    'privacy.mode="local"',
    'privacy.accountant="pld"',
    f"privacy.delta={DELTA}",
    "privacy.max_grad_norm=1.0",
]
# User-level DP-FedAvg over the clients and the canary clients, all of them every round.
CENTRAL_DP = [
    "client.optimizer=sgd",
    "client.lr=0.05",
    "client.augment=none",
    'privacy.mode="central"',
    "privacy.noise_multiplier=1.0",
    "privacy.clip_norm=0.5",
    f"privacy.delta={DELTA}",
]
SECAGG = [
    "client.optimizer=sgd",
    "client.lr=0.05",
    "client.augment=none",
    "secure_aggregation.enabled=true",
    "secure_aggregation.clip_norm=10.0",
]
PLAIN = ["client.optimizer=sgd", "client.lr=0.05", "client.augment=none"]


@dataclass(frozen=True)
class Scale:
    """How big a benchmark: rounds of training, canaries, LiRA reference models, inversion
    optimisation steps, attacked clients, and the inversion sweep."""

    rounds: int
    canaries: int
    strong_canaries: int  # user-level or gradient canaries (cheap: they do not train)
    reference_models: int
    iterations: int
    targets: int
    batch_sizes: tuple[int, ...]
    local_steps: tuple[int, ...]


FULL = Scale(30, 1000, 1000, 4, 2000, 16, (1, 16), (1, 10))
SMALL = Scale(3, 200, 1000, 1, 300, 2, (1, 16), (1,))


def protections(epsilons: list[float], task: Task) -> list[tuple[str, float | None, list[str]]]:
    """(protection, target epsilon, overrides) of every protection benchmarked on ``task``: the
    task's own overrides, then the protection's."""
    out: list[tuple[str, float | None, list[str]]] = [("none", None, PLAIN)]
    for eps in epsilons:
        out.append(("local", eps, [*task.local_dp, *LOCAL_DP, f"privacy.target_epsilon={eps}"]))
    out.append(("central", None, CENTRAL_DP))
    out.append(("secagg", None, SECAGG))
    return [(name, eps, [*task.overrides, *overrides]) for name, eps, overrides in out]


def _full_participation(task: Task, overrides: list[str], seed: int, canaries: int) -> list[str]:
    """User-level canaries (central DP, or ``audit.canary_level="user"``): every client and
    every included canary client in each round."""
    cfg = config_mod.load(task.config, [*overrides, f"experiment.seed={seed}"])
    if canary.level(cfg.privacy.mode, cfg.audit.canary_level) != canary.USER:
        return []
    everyone = cfg.data.num_clients + canary.included_count(canaries, seed)
    return [f"server.clients_per_round={everyone}"]


def _common(row: dict[str, Any], run: target.AuditedRun, task: Task, eps: float | None) -> dict:
    return {
        "task": task.name,
        "protection": run.protection if run.protection != "distributed" else "central",
        "target_epsilon": eps,
        "accounted_epsilon": run.accounted_epsilon,
        "seed": run.cfg.experiment.seed,
        **row,
    }


def canary_only_row(
    task: Task,
    protection: str,
    eps: float | None,
    overrides: list[str],
    seed: int,
    scale: Scale,
    runs: Path,
) -> dict[str, Any]:
    """A run with ``scale.strong_canaries`` of the strongest canaries its protection allows and
    its canary audit's row (``canary_only_run``: no other attack ran on it).

    * Without DP (``none``, ``secagg``) and under central DP: user-level canary clients, all of
      them in every round, each update of norm ``privacy.clip_norm`` (0.5, the central-DP
      clip): what the final model reveals about a whole client.
    * Under local DP: white-box gradient canaries, records whose clipped gradient is the clip
      bound times a coordinate vector, sampled and noised by DP-SGD like the examples: the
      bound an attacker who may craft a record's gradient could prove.
    """
    level = "gradient" if protection == "local" else "user"
    suffix = "" if eps is None else f"_eps{eps:g}"
    extra = [f'audit.canary_level="{level}"']
    if level == "user":
        extra.append("privacy.clip_norm=0.5")
    run, _, trained = _train(
        task,
        f"{protection}{suffix}_{level}_canaries_seed{seed}",
        [*overrides, *extra],
        seed,
        scale.rounds,
        scale.strong_canaries,
        runs,
    )
    row = _common(canary_audit.audit(run), run, task, eps)
    return row | {"seconds_training": trained, "canary_only_run": True}


def update_only_row(
    task: Task, eps: float | None, overrides: list[str], seed: int, scale: Scale, runs: Path
) -> dict[str, Any]:
    """A local-DP run without canaries and the update-level audit of its round-1 update of the
    lowest client (``update_audit_run``): ``scale.strong_canaries`` gradient canaries in the
    replayed DP-SGD, the bound beside that one release's epsilon (``accounted_epsilon``; the
    run's is ``run_epsilon``)."""
    suffix = "" if eps is None else f"_eps{eps:g}"
    run, _, trained = _train(
        task, f"local{suffix}_update_seed{seed}", overrides, seed, scale.rounds, 0, runs
    )
    settings = update_canary.UpdateCanarySettings(
        round=1, canaries=scale.strong_canaries, seed=seed
    )
    row = _common(update_canary.audit(run, settings), run, task, eps)
    return row | {"seconds_training": trained, "update_audit_run": True}


def _train(
    task: Task,
    name: str,
    overrides: list[str],
    seed: int,
    rounds: int,
    canaries: int,
    runs: Path,
) -> tuple[target.AuditedRun, Path, float]:
    """Train ``task``'s example with ``overrides`` and ``canaries`` canaries (every canary
    client in every round) into ``runs/<task>/name``; the run loaded for the audit, its folder
    and the seconds it trained."""
    folder = runs / task.name / name
    if folder.exists():
        shutil.rmtree(folder)
    settings = [
        *overrides,
        f"experiment.seed={seed}",
        f"experiment.rounds={rounds}",
        f"audit.canaries={canaries}",
        "evaluation.every=0",
    ]
    settings += _full_participation(task, settings, seed, canaries)
    t0 = time.perf_counter()
    fedguard.run(task.config, out=folder, overrides=settings, progress=False)
    trained = time.perf_counter() - t0
    return target.load(folder), folder, trained


def audit_one(
    task: Task,
    protection: str,
    eps: float | None,
    overrides: list[str],
    seed: int,
    scale: Scale,
    runs: Path,
) -> list[dict[str, Any]]:
    """Train one audit run and attack it; the rows of the three attacks."""
    name = f"{protection}{'' if eps is None else f'_eps{eps:g}'}_seed{seed}"
    run, folder, trained = _train(task, name, overrides, seed, scale.rounds, scale.canaries, runs)
    rows = []
    c = canary_audit.audit(run)
    rows.append(_common(c, run, task, eps))
    if protection == "local":
        u = update_canary.UpdateCanarySettings(round=1, canaries=scale.strong_canaries, seed=seed)
        rows.append(_common(update_canary.audit(run, u), run, task, eps))
    m = membership.audit(
        run, folder / "membership_roc.png", reference_models=scale.reference_models
    )
    rows.append(
        _common(
            {k: v for k, v in m.items() if k not in ("loss", "lira")}
            | {"loss_auc": m["loss"]["auc"], "lira_auc": (m["lira"] or {}).get("auc")},
            run,
            task,
            eps,
        )
    )
    for b in scale.batch_sizes:
        for steps in scale.local_steps:
            per_target = []
            for client in range(min(scale.targets, run.cfg.data.num_clients)):
                s = inversion.InversionSettings(
                    client=client, batch_size=b, local_steps=steps, iterations=scale.iterations
                )
                png = folder / f"inversion_b{b}_s{steps}_c{client}.png"
                per_target.append(inversion.audit(run, png, s))
            rows.append(
                _common(
                    {
                        "attack": "inversion",
                        "batch_size": b,
                        "local_steps": steps,
                        "targets": len(per_target),
                        "psnr": statistics.median(r["psnr"] for r in per_target),
                        "ssim": statistics.median(r["ssim"] for r in per_target),
                        "baseline_psnr": statistics.median(r["baseline_psnr"] for r in per_target),
                        "mean_image_psnr": statistics.median(
                            r["mean_image_psnr"] for r in per_target
                        ),
                        "observed": per_target[0]["observed"],
                        "update_epsilon": per_target[0]["update_epsilon"],
                        "iterations": scale.iterations,
                    },
                    run,
                    task,
                    eps,
                )
            )
    for r in rows:
        r["seconds_training"] = trained
    return rows


def _key(row: dict[str, Any]) -> tuple[str, str, str, float | None, int]:
    """Which run made a row: :func:`audit_one` (``full``), :func:`canary_only_row`
    (``canary_only``) or :func:`update_only_row` (``update_only``), its protection, target
    epsilon and seed. A rerun replaces the rows of the runs it repeats."""
    kind = "full"
    if row.get("canary_only_run"):
        kind = "canary_only"
    elif row.get("update_audit_run"):
        kind = "update_only"
    return (kind, row["task"], row["protection"], row["target_epsilon"], row["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="medical", help="the example")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--small", action="store_true", help="the quick version (see above)")
    parser.add_argument("--only", nargs="+", default=None, help="protections to run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "audit_benchmark")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--strong-canaries",
        action="store_true",
        help="only canary runs with user-level or gradient canaries (canary_only_run rows)",
    )
    parser.add_argument(
        "--update-audit",
        action="store_true",
        help="only local-DP runs and the audit of one update (update_audit_run rows)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = SMALL if args.small else FULL
    task = TASKS[args.task]
    rows: list[dict[str, Any]] = []
    if args.out.exists():  # rows of other protections and seeds are kept
        rows = json.loads(args.out.read_text()).get("rows", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for protection, eps, overrides in protections(args.epsilons, task):
            if args.only is not None and protection not in args.only:
                continue
            t0 = time.perf_counter()
            if args.update_audit and protection != "local":
                continue
            kind = "canary_only" if args.strong_canaries else "full"
            kind = "update_only" if args.update_audit else kind
            rows = [r for r in rows if _key(r) != (kind, task.name, protection, eps, seed)]
            if args.update_audit:
                rows.append(update_only_row(task, eps, overrides, seed, scale, args.runs))
            elif args.strong_canaries:
                rows.append(
                    canary_only_row(task, protection, eps, overrides, seed, scale, args.runs)
                )
            else:
                rows += audit_one(task, protection, eps, overrides, seed, scale, args.runs)
            print(
                f"{task.name} {protection} eps={eps} seed={seed}: {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            meta = {"scale": scale.__dict__, "small": args.small}
            args.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
