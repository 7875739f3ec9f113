"""What a fit task asks of the client's trainer, by name.

A strategy's client half is more than a learning rate: FedProx adds a proximal term to the local
objective, SCAFFOLD corrects every gradient and sends back a control delta, the Newton step sends
gradient and Hessian sums, and local DP trains with DP-SGD and reports what it ran. A
:class:`~fedguard.client.trainer.ClientTrainer` lists the ones it applies in its ``features``; a
strategy lists the ones its clients need in ``client_features()``. A run whose trainer lacks one
is refused before round 1, and a client refuses a task that asks for one its trainer lacks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedguard.protocol import messages

PROXIMAL_TERM = "proximal_term"  # FedProx: mu/2 ||w - w_global||^2, mu = config "proximal_mu"
CONTROL_VARIATE = "control_variate"  # SCAFFOLD: gradients + c - c_i; reply tensor "control_delta"
NEWTON_STATISTICS = "newton_statistics"  # reply tensors "gradient_sum" and "hessian_sum"
DP_SGD = "dp_sgd"  # local DP: DP-SGD at the task's noise and clip, reported in the reply metrics
CONTROL = "control"  # the fit task tensor that carries SCAFFOLD's server control variate


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
    if config.get("optimizer") == "newton":
        out.add(NEWTON_STATISTICS)
    if messages.DP_SGD_NOISE in config:
        out.add(DP_SGD)
    return frozenset(out)
