"""The run under audit, rebuilt from its run folder.

``fedguard run`` writes the fully resolved ``config.toml``; every data split, partition, model
initialisation and client seed follows from it, so the audit rebuilds the run's
:class:`~fedguard.experiment.assembly.Experiment` (the same data, clients, trainer, privacy
plan and secure aggregation as the run) and loads the model from the run's checkpoints. A run
made with a model or data function passed in Python (``fedguard.run(model_fn=...)``) names
neither in its config and cannot be rebuilt; the audit says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedguard.experiment import checkpoint
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.runfolder import RunFolder


class AuditError(RuntimeError):
    """The audit cannot run on this run folder; the message says why and what to do."""


@dataclass
class AuditedRun:
    """A finished run: its folder, config, rebuilt experiment, summary, and the parameters of
    its last checkpoint (``final``, after round ``final_round``)."""

    folder: RunFolder
    cfg: ExperimentConfig
    exp: Experiment
    summary: dict[str, Any]
    final: torch.Tensor
    final_round: int

    @property
    def name(self) -> str:
        return str(self.folder.root)

    @property
    def accounted_epsilon(self) -> float | None:
        """The epsilon the run reported (None without DP)."""
        eps = self.summary.get("epsilon")
        return None if eps is None else float(eps)

    @property
    def delta(self) -> float:
        """The run's delta: the reported one under DP, else the configured ``privacy.delta``."""
        d = self.summary.get("delta")
        return float(d) if d is not None else float(self.cfg.privacy.delta)

    @property
    def protection(self) -> str:
        """``none``, ``local``, ``central``, ``distributed``, or ``secagg`` (secure aggregation
        without DP)."""
        mode = self.cfg.privacy.mode
        if mode != "off":
            return mode
        return "secagg" if self.cfg.secure_aggregation.enabled else "none"


def load(run_dir: str | Path) -> AuditedRun:
    """Rebuild the run in ``run_dir`` (see the module docstring); an :class:`AuditError` names
    what is missing."""
    folder = RunFolder(run_dir)
    if not folder.config.exists():
        raise AuditError(f"{folder.root}: no config.toml; is it a run folder of `fedguard run`?")
    cfg = config_mod.load(folder.config)
    if cfg.runtime.kind != "inprocess":  # every engine gives the same results; rebuild in process
        toml = config_mod.to_toml_dict(cfg)
        toml["runtime"] = {}
        cfg = config_mod.validate(toml)
    ck = checkpoint.latest(folder.checkpoints, max_round=cfg.experiment.rounds)
    if ck is None:
        raise AuditError(f"{folder.root}: no usable checkpoint; the run finished no round")
    summary: dict[str, Any] = {}
    if folder.summary.exists():
        summary = json.loads(folder.summary.read_text())
    try:
        exp = Experiment(cfg)
    except ConfigError as exc:
        raise AuditError(
            f"{folder.root}: the run cannot be rebuilt from its config: {exc}"
        ) from None
    exp.close()  # the audit drives the clients itself; no transport is needed
    return AuditedRun(folder, cfg, exp, summary, ck.tensors["params"], ck.round)
