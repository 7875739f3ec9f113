"""What a fit task asks of the client's trainer, by name.

A strategy's client half is more than a learning rate: FedProx adds a proximal term to the local
objective, SCAFFOLD corrects every gradient and sends back a control delta, FedDyn adds its dynamic
regulariser and keeps its gradient state, FedNova's clients normalise their update by their local
steps and report the norm, personalisation keeps a personal model on the client (and, for FedRep
and FedPer, sends only the shared body), the Newton step sends
gradient and Hessian sums, and local DP trains with DP-SGD and reports what it ran. A
:class:`~fedguard.client.trainer.ClientTrainer` lists the ones it applies in its ``features``; a
strategy lists the ones its clients need in ``client_features()``. A run whose trainer lacks one
is refused before round 1, and a client refuses a task that asks for one its trainer lacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedguard.protocol import messages

PROXIMAL_TERM = "proximal_term"  # FedProx: mu/2 ||w - w_global||^2, mu = config "proximal_mu"
CONTROL_VARIATE = "control_variate"  # SCAFFOLD: gradients + c - c_i; reply tensor "control_delta"
NEWTON_STATISTICS = "newton_statistics"  # reply tensors "gradient_sum" and "hessian_sum"
DP_SGD = "dp_sgd"  # local DP: DP-SGD at the task's noise and clip, reported in the reply metrics
CONTROL = "control"  # the fit task tensor that carries SCAFFOLD's server control variate
# SCAFFOLD's client state: "control" (the committed c_i), "control_pending" (the c_i of its last
# training, not yet known to count) and "control_rounds" ([2] int64: the round whose aggregated
# update last moved the committed c_i, 0: none, and the round the pending one was trained in);
# the fit config entry "scaffold_aggregated" is the last round whose control delta of the
# task's client entered the server's c (0: none)
CONTROL_PENDING = "control_pending"
CONTROL_ROUNDS = "control_rounds"
SCAFFOLD_AGGREGATED = "scaffold_aggregated"
# FedDyn: -<g_k, w> + alpha/2 ||w - w_global||^2, alpha = config "feddyn_alpha"; state "feddyn_gradient"
DYNAMIC_REGULARIZER = "dynamic_regularizer"
FEDDYN_ALPHA = "feddyn_alpha"  # the fit config entry with FedDyn's alpha
# the fit config entry with the last round whose update of the task's client entered the
# server's h (0: none): the client commits its pending g_k only if it is that round's
FEDDYN_AGGREGATED = "feddyn_aggregated"
FEDDYN_GRADIENT = "feddyn_gradient"  # the client state entry with FedDyn's committed g_k
FEDDYN_PENDING = "feddyn_pending"  # the client state entry with its g_k not yet known to count
# the client state entry [2] (int64): the round whose aggregated update last moved the committed
# g_k (0: none) and the round the pending g_k was trained in
FEDDYN_ROUNDS = "feddyn_rounds"
# FedNova: the update divided by ||a_i||_1 of the local steps; reply tensor "step_norm" [1]
NORMALIZED_UPDATE = "normalized_update"
FEDNOVA = "fednova"  # the fit config entry (true) that asks for FedNova's normalised update
STEP_NORM = "step_norm"  # the reply tensor with FedNova's ||a_i||_1
# Personalisation (fedguard.client.personal): the fit config's "personalization" names the
# method; the client keeps a personal model and, for FedRep / FedPer, sends only the body.
PERSONALIZATION = "personalization"


@dataclass(frozen=True)
class CommittedState:
    """The names of a client state that moves only with an update the server aggregated
    (:mod:`fedguard.algorithms.optimizers.committed`): the fit config entry ``told`` with the
    last round whose update of the task's client entered the server's part, the client state
    entries ``committed``, ``pending`` and ``rounds`` (``[2]`` int64: the committed state's round,
    the pending one's), and how messages call the strategy and the two parts."""

    strategy: str
    server_part: str
    client_part: str
    told: str
    committed: str
    pending: str
    rounds: str


FEDDYN_STATE = CommittedState(
    "FedDyn",
    "h",
    "gradient state",
    FEDDYN_AGGREGATED,
    FEDDYN_GRADIENT,
    FEDDYN_PENDING,
    FEDDYN_ROUNDS,
)
# the committed entry keeps its old name: a state kept before the record counts as committed
SCAFFOLD_STATE = CommittedState(
    "SCAFFOLD",
    "control variate",
    "control variate state",
    SCAFFOLD_AGGREGATED,
    CONTROL,
    CONTROL_PENDING,
    CONTROL_ROUNDS,
)


def asked(
    config: Mapping[str, messages.Scalar], tensors: Mapping[str, torch.Tensor]
) -> frozenset[str]:
    """The features a fit task with this ``config`` and these ``tensors`` asks for."""
    out = set()
    mu = config.get("proximal_mu")
    if isinstance(mu, int | float) and not isinstance(mu, bool) and mu > 0:
        out.add(PROXIMAL_TERM)
    if CONTROL in tensors:
        out.add(CONTROL_VARIATE)
    alpha = config.get(FEDDYN_ALPHA)
    if isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha > 0:
        out.add(DYNAMIC_REGULARIZER)
    if config.get(FEDNOVA) is True:
        out.add(NORMALIZED_UPDATE)
    if config.get("optimizer") == "newton":
        out.add(NEWTON_STATISTICS)
    if messages.DP_SGD_NOISE in config:
        out.add(DP_SGD)
    if config.get(PERSONALIZATION) not in (None, "none"):
        out.add(PERSONALIZATION)
    return frozenset(out)
