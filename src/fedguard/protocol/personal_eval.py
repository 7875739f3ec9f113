"""The server half of personalised evaluation: each client's personal model and the global
model on the client's own held-out data, per client and as mean / worst client.

The server sends an evaluation task whose config names the personalisation method and its
settings (:class:`fedguard.client.personal.PersonalSettings`); each client evaluates the global
parameters and its personal model on the same held-out split and replies with both
(``loss``/``accuracy`` and ``personal_loss``/``personal_accuracy``). The personal model itself
never leaves the client, only these numbers do. Clients count equally in the mean and the worst
client (a fairness view), unlike the pooled federated evaluation, which weighs by examples.

Which clients count: those that hold held-out data of their own. The server asks every client
that holds held-out data (every client of a simulation that holds some; every admitted client
that registered a held-out count, deployed), and the client decides: one whose held-out data is
not its own (a partition too small to keep a ``data.client_eval_fraction`` split out, at least
one example held out and one left to train on, so that it holds its share of the central
evaluation split instead) replies :data:`~fedguard.protocol.messages.NO_OWN_EVAL`, which is
not counted (see :meth:`fedguard.client.app.ClientApp.evaluate`). The rule lives on the client
alone, so a simulated run (in process, under Ray, with the cohort engine) and the same run
deployed count the same clients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedguard.protocol import messages
from fedguard.protocol.transport import Failed, Transport

log = logging.getLogger(__name__)
PERSONAL_KEYS = ("personal_loss", "personal_accuracy", "loss", "accuracy")


@dataclass(frozen=True)
class ClientScores:
    """One client's evaluation: the global and its personal model on its held-out data."""

    client_id: int
    examples: int
    global_accuracy: float
    global_loss: float
    personal_accuracy: float
    personal_loss: float


def _seed(seed: int, round_: int, client_id: int) -> int:
    """A 31-bit seed for one client's fine-tuning in one evaluated round."""
    return int(np.random.SeedSequence([seed, round_, client_id, 0xE7A1]).generate_state(1)[0] >> 1)


def evaluate_personal(
    transport: Transport,
    round_: int,
    params: torch.Tensor,
    clients: Sequence[int],
    config: Mapping[str, messages.Scalar],
    *,
    seed: int,
    deadline_s: float | None = None,
) -> list[ClientScores]:
    """Ask ``clients`` to evaluate ``params`` and their personal models (``config`` carries the
    method, its settings and ``[client]``'s training settings for fine-tuning); the scores of
    the replies that arrive and check out, by client id."""
    requests = {
        cid: messages.encode(
            messages.EvaluateTask(round_, cid, params, {**config, "seed": _seed(seed, round_, cid)})
        )
        for cid in clients
    }
    scores = []
    for outcome in transport.exchange(requests, deadline_s=deadline_s):
        if isinstance(outcome, Failed):
            log.warning(
                "round %d: personal evaluation on client %d failed: %s",
                round_,
                outcome.client_id,
                outcome.reason,
            )
            continue
        try:
            reply = messages.decode(outcome.payload, messages.EvaluateReply)
        except messages.MessageError as exc:
            log.warning("round %d: personal evaluation reply rejected: %s", round_, exc)
            continue
        problem = messages.addressing_problem(reply, outcome.client_id, round_)
        if problem is None and reply.metrics.get(messages.NO_OWN_EVAL) == 1.0:
            log.info(
                "round %d: client %d holds no held-out data of its own; not counted in the "
                "personal evaluation",
                round_,
                reply.client_id,
            )
            continue
        values = [reply.metrics.get(k) for k in PERSONAL_KEYS]
        if problem is None and not all(v is not None and math.isfinite(v) for v in values):
            problem = "it lacks finite personal and global metrics"
        if problem is not None:
            log.warning(
                "round %d: personal evaluation of client %d rejected: %s",
                round_,
                outcome.client_id,
                problem,
            )
            continue
        m = reply.metrics
        scores.append(
            ClientScores(
                reply.client_id,
                reply.num_examples,
                global_accuracy=m["accuracy"],
                global_loss=m["loss"],
                personal_accuracy=m["personal_accuracy"],
                personal_loss=m["personal_loss"],
            )
        )
    return sorted(scores, key=lambda s: s.client_id)


def summarise(scores: Sequence[ClientScores]) -> dict[str, Any]:
    """The metrics row's personal entries: mean and worst client accuracy of the personal and
    the global model (None without scores) and every client's scores."""
    out: dict[str, Any] = {}
    for model in ("personal", "global"):
        accuracies = [getattr(s, f"{model}_accuracy") for s in scores]
        out[f"{model}_accuracy_mean"] = float(np.mean(accuracies)) if accuracies else None
        out[f"{model}_accuracy_worst"] = min(accuracies) if accuracies else None
    out["personal_clients"] = [
        {
            "client": s.client_id,
            "examples": s.examples,
            "personal_accuracy": s.personal_accuracy,
            "personal_loss": s.personal_loss,
            "global_accuracy": s.global_accuracy,
            "global_loss": s.global_loss,
        }
        for s in scores
    ]
    return out
