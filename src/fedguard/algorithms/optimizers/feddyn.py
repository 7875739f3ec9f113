"""FedDyn, both halves in one module (Acar et al., "Federated Learning Based on Dynamic
Regularization", ICLR 2021, Algorithm 1).

Client ``k`` keeps ``g_k``, its record of ``grad L_k`` at its last local model (zero before its
first round), and in round ``t`` minimises the dynamically regularised objective

    ``L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2``

whose gradient is ``grad L_k(theta) - g_k + alpha (theta - theta^{t-1})``; with its new model
``theta_k^t`` it sets ``g_k <- g_k - alpha (theta_k^t - theta^{t-1})``. The server keeps ``h``
(zero at first) and, from the models of the participants ``P_t`` out of ``m`` clients:

    ``h^t = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})``
    ``theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - h^t / alpha``

Updates here are ``delta_k = theta_k^t - theta^{t-1}`` (``local - global``), so the mean of the
received models is ``theta^{t-1} + mean_k delta_k`` and the ``h`` step is ``-alpha (|P_t| / m)
mean_k delta_k``: the participation fraction scales it. Both means are unweighted, as in the
paper. Because every client applies the same ``-alpha delta_k`` to its ``g_k`` that the server
adds (over ``m``) to ``h``, ``h`` stays the mean of all ``m`` clients' ``g_k``; at a fixed point
the ``g_k`` are the clients' gradients at the global optimum of ``sum_k L_k``, which is why FedDyn
reaches it where FedAvg's local steps drift to a mix of the local optima.

A reply that does not reach the aggregate. In Algorithm 1 a client outside ``P_t`` keeps its
``g_k`` (``grad L_k(theta_k^t) = grad L_k(theta_k^{t-1})``), and ``P_t`` is what the server
aggregates. A deployed client that trains and then vanishes, or whose reply the server rejects
or leaves out, has run the client step although it is not in ``P_t``: had it kept its new
``g_k``, the offset ``e = h - (1/m) sum_k g_k`` would grow by ``alpha delta_k / m`` for good (no
later round changes it), and the fixed point, where ``h = 0``, would move from the optimum of
``sum_k L_k`` to that of ``sum_k L_k + m <e, theta>``. So a client keeps its new ``g_k``
*pending*, with the round it trained in, beside the committed one, and the server records per
client the last round whose update entered ``h`` (:func:`record_aggregated`, checkpointed with
``h``) and tells it in its next fit task (:func:`last_aggregated`). Before training, the client
commits the pending ``g_k`` if that round is the one it trained in and drops it if it is the
committed one's (:func:`settled_gradient`); any other round means that its state is not the
one ``h`` was built with, and it refuses to train. So ``h = (1/m) sum_k g_k`` holds over the
committed ``g_k`` after every round, and a client that answers a round twice (a deployed client
that restarts and fetches its open task again) trains from the same state both times.
"""

from __future__ import annotations

import torch


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"FedDyn's alpha must be positive, got {alpha}.")


def correction(client_gradient: torch.Tensor) -> torch.Tensor:
    """The linear part of the regulariser's gradient, added to every local gradient: ``-g_k``.

    The quadratic part ``alpha (theta - theta^{t-1})`` is a proximal term towards the global
    model with ``mu = alpha`` (FedProx's), which the local loops already add."""
    return -client_gradient


def client_gradient_update(
    client_gradient: torch.Tensor, delta: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    """The client's new ``g_k = g_k - alpha * delta_k`` after a round with update ``delta_k``."""
    _check_alpha(alpha)
    return client_gradient - alpha * delta


def server_update(
    params: torch.Tensor,
    h: torch.Tensor,
    deltas: torch.Tensor,
    *,
    alpha: float,
    num_clients: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new ``(h, theta)`` from ``theta^{t-1}`` = ``params [D]``, ``h [D]`` and the cohort's
    updates ``deltas [K, D]`` (``K = |P_t|`` of ``num_clients = m``), computed in float64."""
    _check_alpha(alpha)
    if deltas.ndim != 2 or deltas.shape[0] == 0 or deltas.shape[1] != params.shape[0]:
        raise ValueError(
            f"FedDyn needs a non-empty [K, {params.shape[0]}] matrix of updates, got shape "
            f"{tuple(deltas.shape)}."
        )
    if not deltas.shape[0] <= num_clients:
        raise ValueError(
            f"FedDyn got {deltas.shape[0]} updates from a population of {num_clients} clients."
        )
    mean = deltas.to(torch.float64).mean(0)
    new_h = h.to(torch.float64) - alpha * (deltas.shape[0] / num_clients) * mean
    new_params = params.to(torch.float64) + mean - new_h / alpha
    return new_h.to(h.dtype), new_params.to(params.dtype)


def settled_gradient(
    committed: torch.Tensor | None,
    committed_round: int,
    pending: torch.Tensor | None,
    pending_round: int,
    aggregated_round: int,
    *,
    like: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """The client's ``g_k`` for a new round and the round whose update it was last moved by.

    ``committed`` is the ``g_k`` the server is known to hold in ``h`` (its last update entered
    ``h`` in ``committed_round``; None and 0 before any: zeros shaped as ``like``), ``pending``
    the one trained in ``pending_round`` (None: none), ``aggregated_round`` the server's word:
    the last round whose update of this client entered ``h`` (0: none). The pending ``g_k`` if
    that is the round it was trained in, the committed one if it is the committed round;
    ValueError for any other round, as the state is then not the one the server's ``h`` holds
    (a state lost or replaced, or a server resumed from an older checkpoint than its client)."""
    if pending is not None and aggregated_round == pending_round:
        return pending, pending_round
    if aggregated_round == committed_round:
        return (torch.zeros_like(like) if committed is None else committed), committed_round
    held = f"round {committed_round}" + (
        f" (committed) and {pending_round} (pending)" if pending is not None else ""
    )
    raise ValueError(
        f"FedDyn: the server's h holds this client's update of round {aggregated_round}, its "
        f"gradient state holds {held}; it is not the state the server's h was built with (a "
        "deployed client keeps its state with --state-dir)."
    )


def record_aggregated(record: torch.Tensor, client_ids: list[int], round_: int) -> torch.Tensor:
    """The server's record of the last round each client's update entered ``h`` (``[n]``
    int64 by client id, 0: none; shorter when the highest ids never were), with ``client_ids``'
    updates of ``round_`` aggregated."""
    if any(c < 0 for c in client_ids):
        raise ValueError(f"Client ids must not be negative, got {sorted(client_ids)}.")
    size = max([record.numel(), *(c + 1 for c in client_ids)])
    out = torch.zeros(size, dtype=torch.int64)
    out[: record.numel()] = record.to(torch.int64)
    if client_ids:
        out[torch.tensor(client_ids, dtype=torch.int64)] = round_
    return out


def last_aggregated(record: torch.Tensor, client_id: int) -> int:
    """The last round whose update of ``client_id`` entered ``h`` (0: none), from the record."""
    return int(record[client_id]) if 0 <= client_id < record.numel() else 0
