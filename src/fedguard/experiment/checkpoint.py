"""Checkpoints: the global model, server state and client state after a finished round.

Each checkpoint is a folder ``round_NNNNN`` holding ``tensors.safetensors`` and ``state.json``.
It is written into a temporary folder and renamed into place, so a crash mid-write never leaves
a checkpoint that looks complete; only the newest ``keep`` checkpoints are kept.

``state.json`` carries a digest: the SHA-256 of the tensors file and the SHA-256 of the state
itself without the digest. A checkpoint is used only if both match, its round is the round its
folder names and lies within the run's plan, and every tensor is finite; otherwise the next
older one is tried, with a warning naming what was wrong (see :func:`latest`). The digest
catches damage (a file cut short, an edited value), not a forger, who can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedguard.experiment.config import ConfigError

PREFIX = "round_"
TENSORS = "tensors.safetensors"
STATE = "state.json"
_TMP = re.compile(rf"^\.tmp-{PREFIX}\d+-(\d+)$")
_FINAL = re.compile(rf"^{PREFIX}(\d+)$")

log = logging.getLogger("fedguard")


@dataclass(frozen=True)
class Checkpoint:
    """A finished round's state: ``tensors`` by name and JSON-able ``info``."""

    round: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


class BadCheckpointError(ValueError):
    """A checkpoint folder that must not be resumed from; the message says why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of ``state`` (without its digest) in a canonical JSON form."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save(directory: Path, checkpoint: Checkpoint, *, keep: int) -> Path:
    """Write ``checkpoint`` atomically under ``directory`` and prune older ones.

    Checkpoints of rounds after ``checkpoint.round`` are removed too: they belong to a history
    that a resume from an earlier round has replaced (a damaged or foreign newest folder).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{checkpoint.round:05d}"
    tmp = directory / f".tmp-{PREFIX}{checkpoint.round:05d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().clone() for k, v in checkpoint.tensors.items()}
    blob = save_bytes(tensors)
    _write(tmp / TENSORS, blob)
    state: dict[str, Any] = {"round": checkpoint.round, **checkpoint.info}
    state["digest"] = {"tensors_sha256": _sha256(blob), "state_sha256": _state_digest(state)}
    _write(tmp / STATE, json.dumps(state).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rounds = sorted(_candidates(directory))
    newer = [r for r in rounds if r > checkpoint.round]
    older = [r for r in rounds if r <= checkpoint.round]
    for old in newer + older[:-keep]:
        shutil.rmtree(_folder(directory, old), ignore_errors=True)
    return final


def _folder(directory: Path, round_: int) -> Path:
    return directory / f"{PREFIX}{round_:05d}"


def _candidates(directory: Path) -> list[int]:
    """The rounds of every ``round_NNNNN`` folder, complete or not."""
    if not directory.is_dir():
        return []
    rounds = []
    for p in directory.iterdir():
        m = _FINAL.match(p.name)
        if m and p.is_dir():
            rounds.append(int(m.group(1)))
    return rounds


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the ``.tmp-round_*`` folders a crash mid-write left behind; returns them.

    A folder whose writer (the process id in its name) is another live process is left alone.
    """
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m is None or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except OSError:
        return False
    return True


def load(directory: Path, round_: int, *, max_round: int | None = None) -> Checkpoint:
    """The checkpoint of ``round_``, or :class:`BadCheckpointError` saying what is wrong."""
    path = _folder(directory, round_)
    try:
        state = json.loads((path / STATE).read_bytes())
    except FileNotFoundError:
        raise BadCheckpointError(f"{STATE} is missing") from None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise BadCheckpointError(f"{STATE} cannot be read ({exc})") from None
    if not isinstance(state, dict):
        raise BadCheckpointError(f"{STATE} is not a JSON object")
    digest = state.get("digest")
    if not isinstance(digest, dict) or not all(
        isinstance(digest.get(k), str) for k in ("tensors_sha256", "state_sha256")
    ):
        raise BadCheckpointError(f"{STATE} has no digest")
    if digest["state_sha256"] != _state_digest(state):
        raise BadCheckpointError(f"{STATE} does not match its digest (edited or damaged)")
    saved_round = state.get("round")
    if not isinstance(saved_round, int) or isinstance(saved_round, bool):
        raise BadCheckpointError(f"{STATE} has no round number")
    if saved_round != round_:
        raise BadCheckpointError(f"{STATE} says round {saved_round} but the folder is {path.name}")
    if saved_round < 1:
        raise BadCheckpointError(f"round {saved_round} is not a finished round")
    if max_round is not None and saved_round > max_round:
        raise BadCheckpointError(
            f"round {saved_round} is past the plan's experiment.rounds = {max_round}"
        )
    try:
        blob = (path / TENSORS).read_bytes()
    except FileNotFoundError:
        raise BadCheckpointError(f"{TENSORS} is missing") from None
    except OSError as exc:
        raise BadCheckpointError(f"{TENSORS} cannot be read ({exc})") from None
    if _sha256(blob) != digest["tensors_sha256"]:
        raise BadCheckpointError(
            f"{TENSORS} does not match its digest (edited, damaged or cut short)"
        )
    try:
        tensors = load_bytes(blob)
    except Exception as exc:  # safetensors raises its own error type on a malformed file
        raise BadCheckpointError(f"{TENSORS} cannot be parsed ({exc})") from None
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise BadCheckpointError(f"tensor {name!r} holds NaN or infinite values")
    info = {k: v for k, v in state.items() if k not in ("round", "digest")}
    return Checkpoint(saved_round, tensors, info)


def latest(directory: Path, *, max_round: int | None = None) -> Checkpoint | None:
    """The newest good checkpoint, or ``None`` when there is none at all.

    A checkpoint that fails its checks (see :func:`load`; ``max_round`` is the plan's
    ``experiment.rounds``) is skipped with a logged warning naming the folder and the problem,
    and the next older one is tried. When checkpoints exist but none is good, this raises
    :class:`~fedguard.experiment.config.ConfigError` (one line) rather than start over.
    """
    rounds = sorted(_candidates(directory), reverse=True)
    problems = []
    for round_ in rounds:
        name = _folder(directory, round_).name
        try:
            found = load(directory, round_, max_round=max_round)
        except BadCheckpointError as exc:
            problems.append(f"{name}: {exc}")
            log.warning("checkpoint %s is not used: %s", _folder(directory, round_), exc)
            continue
        if problems:
            log.warning("falling back to checkpoint %s", _folder(directory, round_))
        return found
    if problems:
        raise ConfigError(
            f"{directory}: no usable checkpoint ({'; '.join(problems)}); "
            "the run cannot be resumed from this folder"
        )
    return None


def resume_point(directory: Path, *, max_round: int) -> Checkpoint | None:
    """What a run calls when it starts: remove stale temporaries, then :func:`latest`."""
    removed = remove_stale_temporaries(directory)
    if removed:
        log.warning(
            "removed %d unfinished checkpoint folder(s) left by an interrupted write in %s",
            len(removed),
            directory,
        )
    return latest(directory, max_round=max_round)
