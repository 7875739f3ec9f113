"""SCAFFOLD control variates (Karimireddy et al. 2020), both halves in one module.

The client corrects every local gradient by ``c - c_i`` (server minus client control variate)
and, after ``K`` local steps of learning rate ``lr``, updates its own variate with option II of
the paper: ``c_i+ = c_i - c + (x - y_i) / (K lr)``, where ``x - y_i = -delta_i``. The server
moves its variate by ``(|S| / N) * mean_i(c_i+ - c_i)``. With every variate zero at first this
keeps ``c = (1/N) sum_i c_i`` over the ``N`` clients (Algorithm 1 of the paper), as long as a
client's ``c_i+`` replaces its ``c_i`` exactly when its ``c_i+ - c_i`` enters ``c``.

A reply that does not reach the aggregate. A client whose reply is lost after it trained, or
rejected, has computed ``c_i+`` although ``S`` does not hold it: had it kept ``c_i+``, ``c``
would stay off the mean of the ``c_i`` by ``(c_i+ - c_i) / N`` for the rest of the run, and every
client's correction ``c - c_i`` with it. So a client keeps ``c_i+`` pending beside the committed
``c_i`` and commits it only when the server's per-client record of the last round whose control
delta entered ``c`` (told in its next fit task) names the round it trained in; a record that
names neither round means that its state is not the one ``c`` holds, and it refuses to train.
The mechanism is FedDyn's too: :mod:`fedguard.algorithms.optimizers.committed`.
"""

from __future__ import annotations

import torch


def correction(server_control: torch.Tensor, client_control: torch.Tensor) -> torch.Tensor:
    """The term added to each local gradient: ``c - c_i``."""
    return server_control - client_control


def client_control_update(
    server_control: torch.Tensor,
    client_control: torch.Tensor,
    delta: torch.Tensor,
    *,
    local_steps: int,
    lr: float,
) -> torch.Tensor:
    """The client's new control variate after a round (option II)."""
    if local_steps < 1:
        raise ValueError(f"SCAFFOLD needs at least one local step, got {local_steps}.")
    if not lr > 0:
        raise ValueError(f"SCAFFOLD needs a positive local learning rate, got {lr}.")
    return client_control - server_control - delta / (local_steps * lr)


def server_control_update(
    server_control: torch.Tensor, control_deltas: torch.Tensor, *, num_clients: int
) -> torch.Tensor:
    """The server's new control variate from the cohort's ``[K, D]`` control deltas."""
    if control_deltas.ndim != 2 or control_deltas.shape[0] == 0:
        raise ValueError("SCAFFOLD needs a non-empty [K, D] matrix of control deltas.")
    fraction = control_deltas.shape[0] / num_clients
    return server_control + fraction * control_deltas.to(torch.float64).mean(0).to(torch.float32)
