"""FedNova's normalised averaging (Wang et al., "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020, eq. 6 and Section 4).

A client that takes ``tau_i`` local SGD steps of learning rate ``eta`` moves by
``delta_i = -eta G_i a_i``, where ``G_i`` stacks its stochastic gradients and ``a_i`` weighs them.
Plain SGD has ``a_i = [1, ..., 1]``, so ``||a_i||_1 = tau_i``. SGD with momentum ``rho`` (buffer
reset each round, ``b_1 = g_1``, ``b_j = rho b_{j-1} + g_j``) weighs gradient ``j`` by
``(1 - rho^{tau_i - j + 1}) / (1 - rho)``, so

    ``||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``.

FedAvg's weighted mean ``sum_i p_i delta_i`` lets clients with more steps pull the model towards
their own optimum (the objective becomes inconsistent). FedNova averages the normalised updates
``d_i = delta_i / ||a_i||_1`` and rescales by the effective number of steps:

    ``delta = tau_eff sum_i p_i d_i``,  ``tau_eff = sum_i p_i ||a_i||_1``,  ``p_i = n_i / n``

(``n`` the cohort's examples). When every client has the same ``a_i`` it is FedAvg's mean.
"""

from __future__ import annotations

import torch

from fedguard.algorithms.optimizers import aggregation


def step_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of ``steps`` local SGD steps with heavy-ball ``momentum`` (0: plain SGD)."""
    if steps < 1:
        raise ValueError(f"FedNova needs at least one local step, got {steps}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"FedNova's SGD momentum must be in [0, 1), got {momentum}.")
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def normalise(delta: torch.Tensor, norm: float) -> torch.Tensor:
    """The client's normalised update ``d_i = delta_i / ||a_i||_1``."""
    if not norm > 0:
        raise ValueError(f"FedNova's step norm must be positive, got {norm}.")
    return (delta.double() / norm).to(delta.dtype)


def aggregate(normalised: torch.Tensor, norms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``tau_eff sum_i p_i d_i`` from the normalised updates ``[K, D]``, their step norms
    ``||a_i||_1`` ``[K]`` and the example counts ``n_i`` ``[K]`` (``p_i = n_i / sum n``)."""
    if norms.shape != weights.shape or norms.shape != (normalised.shape[0],):
        raise ValueError(
            f"FedNova needs one step norm and one weight per update: got {tuple(norms.shape)} "
            f"and {tuple(weights.shape)} for {normalised.shape[0]} updates."
        )
    a = norms.to(torch.float64)
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"FedNova's step norms must be finite and positive, got {a.tolist()}.")
    mean = aggregation.weighted_mean(normalised, weights)  # checks the weights
    w = weights.to(torch.float64)
    tau_eff = float((w * a).sum() / w.sum())
    return (mean.double() * tau_eff).to(torch.float32)
