"""The simulation engine ``[runtime]`` names, built over a client app: in-process or cohorts.

Shared by the driver's process (``runtime.kind = "inprocess" | "cohort"``) and by each Ray actor
(``runtime.kind = "ray"`` with ``actor_engine = "cohort"``), so both build the cohort engine the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedguard.client.app import ClientApp
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.config_sections import COHORT_SIZE_ACCELERATOR, COHORT_SIZE_CPU
from fedguard.protocol.transport import Transport
from fedguard.simulation import cohort as cohort_engine
from fedguard.simulation.inprocess import InProcessTransport
from fedguard.simulation.latency import LatencyModel


def cohort_transport(
    cfg: ExperimentConfig, app: ClientApp, client_ids: Sequence[int]
) -> cohort_engine.CohortTransport:
    """The cohort engine on its device (a :class:`ConfigError` when ``cohort_device = "cuda"``
    and torch sees no CUDA device)."""
    device = cohort_engine.resolve_device(cfg.runtime.cohort_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            'runtime.cohort_device = "cuda" but torch sees no CUDA device: use "auto" or "cpu"'
        )
    size = cfg.runtime.cohort_size
    if size is None:
        size = COHORT_SIZE_CPU if device.type == "cpu" else COHORT_SIZE_ACCELERATOR
    return cohort_engine.CohortTransport(app, client_ids, cohort_size=size, device=device)


def local_transport(
    cfg: ExperimentConfig,
    app: ClientApp,
    client_ids: Sequence[int],
    latency: LatencyModel | None = None,
) -> Transport:
    """``runtime.kind = "inprocess"`` (with the latency model, if any) or ``"cohort"``."""
    if cfg.runtime.kind == "cohort":
        return cohort_transport(cfg, app, client_ids)
    return InProcessTransport(app.handle, list(client_ids), latency=latency)
