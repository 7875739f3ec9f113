"""Checkpoints: the global model, server state and client state after a finished round.

Each checkpoint is a folder ``round_NNNNN`` holding ``tensors.safetensors`` and ``state.json``.
It is written into a temporary folder and renamed into place, so a crash mid-write never leaves
a checkpoint that looks complete; only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "round_"


@dataclass(frozen=True)
class Checkpoint:
    """A finished round's state: ``tensors`` by name and JSON-able ``info``."""

    round: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def save(directory: Path, checkpoint: Checkpoint, *, keep: int) -> Path:
    """Write ``checkpoint`` atomically under ``directory`` and prune older ones."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{checkpoint.round:05d}"
    tmp = directory / f".tmp-{PREFIX}{checkpoint.round:05d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().clone() for k, v in checkpoint.tensors.items()}
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"round": checkpoint.round, **checkpoint.info}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_finished(directory))[:-keep]:
        shutil.rmtree(directory / f"{PREFIX}{old:05d}", ignore_errors=True)
    return final


def _finished(directory: Path) -> list[int]:
    rounds = []
    for p in directory.glob(f"{PREFIX}*"):
        if p.is_dir() and (p / "state.json").exists() and (p / "tensors.safetensors").exists():
            try:
                rounds.append(int(p.name.removeprefix(PREFIX)))
            except ValueError:
                continue
    return rounds


def latest(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or ``None`` when there is none."""
    rounds = sorted(_finished(directory)) if directory.exists() else []
    if not rounds:
        return None
    path = directory / f"{PREFIX}{rounds[-1]:05d}"
    info = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "tensors.safetensors"))
    return Checkpoint(int(info.pop("round")), tensors, info)
