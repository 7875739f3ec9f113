"""Federated Newton for convex models: the pooled Newton step from per-client statistics.

Each client sends the example-weighted sums of its loss gradient ``g_k = sum_i grad l_i`` and
Hessian ``H_k = sum_i hess l_i`` at the global point. Sums are all the server needs (so the step
is compatible with secure aggregation), and the step it takes is exactly the centralized Newton
step on the pooled data: ``delta = -(sum_k H_k / n + lambda I)^-1 (sum_k g_k / n)``.
"""

from __future__ import annotations

import torch


def newton_direction(
    gradient_sum: torch.Tensor,
    hessian_sum: torch.Tensor,
    num_examples: float,
    *,
    damping: float = 0.0,
) -> torch.Tensor:
    """Solve the pooled Newton system; ``damping`` adds a ridge for nearly singular Hessians."""
    d = gradient_sum.shape[0]
    if hessian_sum.shape != (d, d):
        raise ValueError(f"Expected a {d}x{d} Hessian, got shape {tuple(hessian_sum.shape)}.")
    if not num_examples > 0:
        raise ValueError(f"The Newton step needs a positive example count, got {num_examples}.")
    g = gradient_sum.to(torch.float64) / num_examples
    h = hessian_sum.to(torch.float64) / num_examples
    h = 0.5 * (h + h.T) + damping * torch.eye(d, dtype=torch.float64)
    step, info = torch.linalg.solve_ex(h, -g)
    if int(info) != 0 or not bool(torch.isfinite(step).all()):
        raise ValueError(
            "The pooled Hessian is singular: add client.weight_decay > 0 (a ridge term) "
            "or use a positive damping."
        )
    return step.to(torch.float32)
