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
*pending*, with the round it trained in, beside the committed one, and commits it only when the
server's record (checkpointed with ``h``, told to each client in its next fit task) says that
round's update entered ``h``; any other round than the pending or the committed one's means
that its state is not the one ``h`` was built with, and it refuses to train. (The mechanism,
SCAFFOLD's too, is :mod:`fedguard.algorithms.optimizers.committed`.) So ``h = (1/m) sum_k g_k``
holds over the committed ``g_k`` after every round, and a client that answers a round twice (a
deployed client that restarts and fetches its open task again) trains from the same state both
times.
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
