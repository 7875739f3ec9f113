"""The update-level canary audit: the one-run audit of one client's update in one round, as the
server sees it.

The final-model canary audit (:mod:`fedguard.audit.canary_audit`) measures what the released
model reveals. Under local DP the server is a stronger attacker than that: it sees each
client's update of each round, and the privacy of one record of the client rests on that one
release, DP-SGD's ``steps`` noisy steps at sampling rate ``q``. This audit measures exactly that
release (Steinke, Nasr and Jagielski's white-box setting with Dirac gradient canaries, one run):

* the round is replayed with the run's client code (:mod:`fedguard.audit.replay`): the attacked
  client trains on its whole training set with the round's task, as it did in the run;
* ``M`` gradient canaries (:func:`fedguard.audit.canary.gradient_coordinates`, drawn from the
  audit's ``seed``) are candidates, each included with probability 1/2 by a seeded coin; an
  included canary is a record of this client whose clipped gradient is ``C e_c`` at its own
  coordinate ``c``: DP-SGD samples it at the examples' rate and adds it to the clipped sum before
  the noise (:func:`fedguard.client.dp_sgd.train`), so it is protected exactly as a record is;
* the server's view is the update (under secure aggregation the round's sum), and each
  canary's score is minus that view at its coordinate (descent moves against the gradient);
* when the client's DP-SGD took full batches (sampling rate 1: every record in every step, as in
  DP-GD), the scores are *informed*: the adversary that DP guards against knows every record
  but the canary and the round's model, so it computes the update the client's own records
  give without noise (the same replay with noise multiplier 0 and no canaries; under secure
  aggregation, the noiseless sum) and subtracts it. What is left at a canary's coordinate is
  its push, if included, plus DP-SGD's noise, which is what the accounting bounds. The
  reference depends on neither the coins nor the noise, so the bound stays valid. With Poisson
  sampling (rate below 1) the records a step took are secret, so the scores stay *blind*;
* the bound at 95% confidence (:mod:`fedguard.audit.one_run`) is set beside the epsilon of that
  one release, composed by dp-accounting's PLD accountant from what the reply reports it ran
  (noise multiplier, steps, sampling rate): not the run's epsilon over all rounds, which is
  larger. A bound above the release's epsilon means DP-SGD or its report is broken, and the
  audit fails loudly, as the final-model audit does.

The canaries exist only in the replay: the run itself is untouched, and the run's own canaries
(if it has any) are left out of the replayed update. Only runs with local DP are audited this
way: without DP-SGD the update protects no record, and central and distributed DP protect
clients only in the aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedguard.algorithms.privacy import accounting
from fedguard.audit import canary, canary_audit, one_run
from fedguard.audit.replay import RoundReplay
from fedguard.audit.target import AuditedRun, AuditError
from fedguard.protocol import messages

_SEED_STREAM = 0xA0D17  # the audit's canaries: a stream apart from the run's own canaries


@dataclass(frozen=True)
class UpdateCanarySettings:
    """The attacked ``round`` and ``client`` (None: the lowest id sampled), ``canaries``
    candidates, and the ``seed`` of their coordinates and inclusion coins."""

    round: int = 1
    client: int | None = None
    canaries: int = 1000
    seed: int = 0


def coins(seed: int, count: int) -> np.ndarray:
    """Which of ``count`` candidate canaries are included: seeded fair coins."""
    return np.random.default_rng([seed, _SEED_STREAM]).random(count) < 0.5


def release_epsilon(reply: messages.FitReply, delta: float) -> float:
    """The epsilon at ``delta`` of this one update for a record of its client: DP-SGD's steps,
    Poisson sampling rate and noise multiplier as the reply reports them, composed by PLD."""
    metrics = reply.metrics
    missing = [k for k in messages.DP_SGD_REPORT if k not in metrics]
    if missing:
        raise AuditError(f"the replayed reply does not report {', '.join(missing)}")
    mechanism = accounting.SampledGaussian(
        float(metrics[messages.DP_SGD_RAN_NOISE]),
        round(float(metrics[messages.DP_SGD_RAN_STEPS])),
        float(metrics[messages.DP_SGD_RAN_RATE]),
    )
    return accounting.epsilon(mechanism, delta, accounting.Accountant.PLD)


def audit(run: AuditedRun, settings: UpdateCanarySettings) -> dict[str, Any]:
    """The update-level canary row: the bound, the guesses behind it, the release's own epsilon
    (``accounted_epsilon``), the run's (``run_epsilon``) and whether the bound exceeds the
    release's (``violation``)."""
    if run.cfg.privacy.mode != "local":
        raise AuditError(
            f"{run.name}: the update-level canary audit measures DP-SGD's protection of one "
            f"update; this run has privacy.mode = {run.cfg.privacy.mode!r} (use --attack canary "
            "for the final model, or --attack inversion for an unprotected update)"
        )
    if settings.canaries < 2:
        raise AuditError(f"the audit needs at least 2 canaries, got {settings.canaries}")
    replay = RoundReplay.load(run, settings.round)
    cid = replay.client(settings.client)
    try:
        coordinates = canary.gradient_coordinates(settings.seed, settings.canaries, run.exp.model)
    except ValueError as exc:
        raise AuditError(f"{run.name}: {exc}") from None
    included = coins(settings.seed, settings.canaries)
    inner = run.exp.trainer
    if isinstance(inner, canary.GradientCanaryTrainer):
        inner = inner.inner  # the run's own canaries belong to the final-model audit
    trainer = canary.GradientCanaryTrainer(inner, {cid: coordinates[torch.from_numpy(included)]})
    data = run.exp.fed.clients[cid]
    reply = replay.fit(cid, data, trainer=trainer)
    view, seen = replay.observed(cid, reply)
    informed = float(reply.metrics.get(messages.DP_SGD_RAN_RATE, 0.0)) >= 1.0
    if informed:
        quiet: dict[str, messages.Scalar] = {messages.DP_SGD_NOISE: 0.0}
        reference, _ = replay.observed(cid, replay.fit(cid, data, quiet, trainer=inner), quiet)
        view = view - reference
    scores = canary.gradient_scores(view, coordinates)
    result = one_run.audit(scores, included, run.delta, confidence=canary_audit.CONFIDENCE)
    eps = release_epsilon(reply, run.delta)
    return {
        "attack": "update",
        "canary_kind": canary.GRADIENT,
        "round": settings.round,
        "client": cid,
        "observed": seen,
        "scoring": "informed" if informed else "blind",
        "canaries": settings.canaries,
        "canaries_included": int(included.sum()),
        "audit_seed": settings.seed,
        "run_epsilon": run.accounted_epsilon,
        "dp_sgd_steps": round(float(reply.metrics[messages.DP_SGD_RAN_STEPS])),
        "dp_sgd_sampling_rate": float(reply.metrics[messages.DP_SGD_RAN_RATE]),
        "dp_sgd_noise_multiplier": float(reply.metrics[messages.DP_SGD_RAN_NOISE]),
        **canary_audit.bound_fields(result, scores, included, eps),
    }
