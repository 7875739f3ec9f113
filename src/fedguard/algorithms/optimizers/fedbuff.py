"""FedBuff's staleness weighting (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022, Algorithm 1).

A client trains from the global model of version ``v``; when its update ``u`` reaches the server
at version ``t`` its staleness is ``tau = t - v``. The server adds ``s(tau) * u`` to a buffer and,
once the buffer holds ``K`` updates, applies their mean ``(1/K) sum_i s(tau_i) u_i`` with the
server optimizer (the paper's ``x <- x - eta_g * Delta_bar`` with ``Delta_bar`` its sign of the
update; ours is ``local - global``, so the step adds). The paper's default staleness function is
``s(tau) = 1 / sqrt(1 + tau)``; we take the polynomial family ``s(tau) = (1 + tau)^(-a)``
(``a = 0.5`` the paper's, ``a = 0`` no discount).

The buffer's aggregate is any aggregator over the rows ``s(tau_i) u_i``: with the weighted mean
and equal client sizes it is exactly the paper's ``(1/K) sum_i s(tau_i) u_i``.
"""

from __future__ import annotations

import torch


def staleness_weights(staleness: torch.Tensor, exponent: float) -> torch.Tensor:
    """``(1 + tau)^(-exponent)`` per entry of ``staleness [K]`` (non-negative integers), float64."""
    if exponent < 0:
        raise ValueError(f"The staleness exponent must be non-negative, got {exponent}.")
    tau = staleness.to(torch.float64)
    if bool((tau < 0).any()):
        raise ValueError(f"Staleness cannot be negative, got {staleness.tolist()}.")
    return (1.0 + tau).pow(-exponent)


def scaled_updates(updates: torch.Tensor, staleness: torch.Tensor, exponent: float) -> torch.Tensor:
    """The buffer's rows ``s(tau_i) * u_i`` for ``updates [K, D]`` and ``staleness [K]``, in the
    updates' dtype (the weight is computed in float64)."""
    if updates.ndim != 2 or staleness.shape != (updates.shape[0],):
        raise ValueError(
            f"Need updates [K, D] and staleness [K], got {tuple(updates.shape)} and "
            f"{tuple(staleness.shape)}."
        )
    w = staleness_weights(staleness, exponent)
    return (updates.double() * w[:, None]).to(updates.dtype)
