"""``fedguard audit RUN_DIR``: attack a finished run as an adversary would and write
``audit/`` in it (or ``--out``): ``audit.json`` with one row per attack, the pictures, and one
summary line per attack for the console.

* ``canary``: the one-run empirical epsilon lower bound beside the accounted epsilon
  (:mod:`fedguard.audit.canary_audit`); a bound above the accounted epsilon is an error.
* ``membership``: loss-threshold and offline LiRA membership inference on the final model
  (:mod:`fedguard.audit.membership`).
* ``inversion``: gradient inversion of one client's update (:mod:`fedguard.audit.inversion`).

``all`` runs the canary audit when the run has canaries, and the other two always.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedguard.audit import canary, canary_audit, inversion, membership, target, update_canary

ATTACKS = ("canary", "update", "membership", "inversion")


@dataclass(frozen=True)
class AuditOptions:
    """What to attack: the membership attack's reference models and evaluated members, the
    inversion's round, client, records, local steps and optimisation iterations, and the
    update-level canary audit's round, client, canaries and seed."""

    reference_models: int = membership.DEFAULT_REFERENCE_MODELS
    max_members: int = membership.DEFAULT_MAX_MEMBERS
    inversion: inversion.InversionSettings = field(default_factory=inversion.InversionSettings)
    update: update_canary.UpdateCanarySettings = field(
        default_factory=update_canary.UpdateCanarySettings
    )


@dataclass(frozen=True)
class AuditReport:
    """The rows of ``audit.json``, where it was written, and one console line per attack."""

    rows: list[dict[str, Any]]
    path: Path
    lines: list[str]

    @property
    def violations(self) -> list[dict[str, Any]]:
        """The canary rows whose lower bound exceeds the accounted epsilon."""
        return [r for r in self.rows if r.get("violation")]


def _line(row: dict[str, Any]) -> str:
    """One summary line of an attack's row."""
    eps = row.get("accounted_epsilon")
    accounted = "no DP" if eps is None else f"accounted epsilon {eps:.3g}"
    if row["attack"] == "canary":
        verdict = " — ERROR: above the accounted epsilon" if row["violation"] else ""
        return (
            f"canary: epsilon lower bound {row['epsilon_lower_bound']:.3g} at "
            f"{row['confidence']:.0%} ({row['canaries']} {row['canary_kind']}-level canaries, "
            f"{row['correct_guesses']}/{row['guesses']} guesses right), {accounted}{verdict}"
        )
    if row["attack"] == "update":
        verdict = " — ERROR: above this update's accounted epsilon" if row["violation"] else ""
        run_eps = row.get("run_epsilon")
        whole = "" if run_eps is None else f"; the whole run's {run_eps:.3g}"
        return (
            f"update: epsilon lower bound {row['epsilon_lower_bound']:.3g} at "
            f"{row['confidence']:.0%} ({row['canaries']} gradient canaries in client "
            f"{row['client']}'s round-{row['round']} update, attacker sees {row['observed']}; "
            f"{row['correct_guesses']}/{row['guesses']} guesses right), this update's accounted "
            f"epsilon {row['accounted_epsilon']:.3g}{whole}{verdict}"
        )
    if row["attack"] == "membership":
        lira = (
            f"LiRA AUC {row['lira']['auc']:.3f} ({row['reference_models']} reference models)"
            if row["lira"] is not None
            else "no LiRA (no reference models, or too few non-members to train them)"
        )
        return (
            f"membership: loss attack AUC {row['loss']['auc']:.3f}, {lira}, TPR at 1% FPR "
            f"{row['tpr_at_1pct_fpr']:.3f} ({row['scored_by']}; {row['members']} members, "
            f"{row['non_members']} non-members), {accounted}"
        )
    return (
        f"inversion: PSNR {row['psnr']:.1f} dB (random images {row['baseline_psnr']:.1f} dB), "
        f"SSIM {row['ssim']:.3f}, client {row['client']} round {row['round']}, batch "
        f"{row['batch_size']}, {row['local_steps']} local step(s), attacker sees "
        f"{row['observed']}, {accounted}"
    )


def audit(
    run_dir: str | Path,
    attacks: Sequence[str] = ("all",),
    *,
    out: str | Path | None = None,
    options: AuditOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Run ``attacks`` (names of :data:`ATTACKS`, or ``all``) on the run in ``run_dir`` and
    write ``audit.json`` and the pictures to ``out`` (default ``RUN_DIR/audit``)."""
    options = options or AuditOptions()
    run = target.load(run_dir)
    folder = Path(out) if out is not None else run.folder.root / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = list(ATTACKS) if "all" in attacks else list(dict.fromkeys(attacks))
    if "all" in attacks and not (run.folder.root / canary.FILE).exists():
        chosen.remove("canary")  # all: the canary audit only where the run has canaries
    if "all" in attacks and run.cfg.privacy.mode != "local":
        chosen.remove("update")  # all: the update-level audit only where DP-SGD protects updates
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for name in chosen:
        if progress is not None:
            progress(name)
        if name == "canary":
            row = canary_audit.audit(run)
        elif name == "update":
            row = update_canary.audit(run, options.update)
        elif name == "membership":
            row = membership.audit(
                run,
                folder / "membership_roc.png",
                reference_models=options.reference_models,
                max_members=options.max_members,
            )
        elif name == "inversion":
            row = inversion.audit(run, folder / "inversion.png", options.inversion)
        else:
            raise ValueError(f"No attack {name!r}: choose from {', '.join(ATTACKS)} or all.")
        row = {
            "run": run.name,
            "protection": run.protection,
            "accounted_epsilon": run.accounted_epsilon,
            "delta": run.delta,
            "seed": run.cfg.experiment.seed,
            **row,
        }
        rows.append(row)
        lines.append(_line(row))
    path = folder / "audit.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run": run.name, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, path)
    return AuditReport(rows, path, lines)
