"""``fedguard audit --attack canary``: score a run's canaries on its final model and put the
one-run empirical epsilon lower bound (:mod:`fedguard.audit.one_run`) beside the accounted
epsilon. A lower bound above the accounted epsilon means the accounting or the implementation
is wrong (at 95% confidence); the result says so with ``violation`` and the command fails."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from fedguard.audit import canary, one_run
from fedguard.audit.target import AuditedRun, AuditError

CONFIDENCE = 0.95


def scores(run: AuditedRun) -> tuple[canary.CanaryPlan, np.ndarray]:
    """The run's canary plan, checked against ``canaries.json``, and every canary's score on
    the final model (higher: more likely included)."""
    path = run.folder.root / canary.FILE
    if not path.exists():
        raise AuditError(
            f"{run.name}: the run has no canaries; rerun it with `fedguard run ... "
            "--audit-canaries M` (e.g. M = 1000) to audit it with --attack canary"
        )
    recorded = json.loads(path.read_text())
    plan = run.exp.canaries
    if plan is None or plan.to_json() != canary.CanaryPlan.from_json(recorded).to_json():
        raise AuditError(
            f"{run.name}: {canary.FILE} does not match the canaries its config regenerates"
        )
    if plan.kind == canary.RECORD:
        records = run.exp.canary_records
        if records is None or canary.digest(*records) != recorded.get("digest"):
            raise AuditError(f"{run.name}: the record canaries do not regenerate ({canary.FILE})")
        model = run.exp.model
        model.set_flat(run.exp.initial_params)
        before = canary.record_scores(model, *records)
        model.set_flat(run.final)
        return plan, canary.record_scores(model, *records) - before
    change = run.final - run.exp.initial_params
    if plan.kind == canary.GRADIENT:
        coordinates = canary.gradient_coordinates(plan.seed, plan.count, run.exp.model)
        return plan, canary.gradient_scores(change, coordinates)
    return plan, canary.user_scores(change, plan.seed, plan.count)


def bound_fields(
    result: one_run.AuditResult,
    scores: np.ndarray,
    included: np.ndarray,
    accounted: float | None,
) -> dict[str, Any]:
    """The fields every canary row has: the bound and the guesses behind it, the ``accounted``
    epsilon it is set beside, the tightness, whether the bound exceeds it (``violation``), and
    the mean score of the included and of the excluded canaries."""
    limit = math.inf if accounted is None else accounted
    return {
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "confidence": result.confidence,
        "delta": result.delta,
        "guesses": result.guesses,
        "correct_guesses": result.correct,
        "guess_counts_tried": result.tried,
        "accounted_epsilon": accounted,
        "tightness": (
            None if accounted is None or accounted <= 0 else result.epsilon_lower_bound / accounted
        ),
        "violation": bool(result.epsilon_lower_bound > limit),
        "mean_score_included": float(scores[included].mean()) if included.any() else None,
        "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else None,
    }


def audit(run: AuditedRun) -> dict[str, Any]:
    """The canary audit's row: the lower bound, the guesses behind it, the accounted epsilon
    and whether the bound exceeds it (``violation``)."""
    plan, s = scores(run)
    included = np.asarray(plan.included, dtype=bool)
    result = one_run.audit(s, included, run.delta, confidence=CONFIDENCE)
    return {
        "attack": "canary",
        "canary_kind": plan.kind,
        "canaries": plan.count,
        "canaries_included": int(included.sum()),
        **bound_fields(result, s, included, run.accounted_epsilon),
    }
