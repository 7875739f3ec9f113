"""A fast test that a tensor holds no NaN or infinity, for checks on every reply of every round."""

from __future__ import annotations

import numpy as np
import torch


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``; through NumPy for CPU float tensors, about 10x faster.

    ``torch.isfinite`` on CPU is slow for large vectors (about 0.3 ms for 120k floats), and every
    reply of every round is checked, on the driver and again at a deployed server's door.
    """
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())
