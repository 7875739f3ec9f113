"""Checkpoints are checked before a run resumes from them: digest, round, plan, finiteness.

A damaged or foreign newest checkpoint is skipped with a warning naming it and the problem, and
the run resumes from the previous good one; when none is good the run is refused (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file, save_file

import fedguard
from conftest import tiny_config
from fedguard import cli
from fedguard.experiment import checkpoint
from fedguard.experiment.config import ConfigError

ROUNDS = 4


def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def _params(folder: Path, round_: int) -> torch.Tensor:
    return load_file(str(folder / "checkpoints" / f"round_{round_:05d}" / "tensors.safetensors"))[
        "params"
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 4-round run, and the same run stopped after round 3 (checkpoints 2, 3)."""
    root = tmp_path_factory.mktemp("runs")
    config = root / "exp.toml"
    config.write_text(tomli_w.dumps(tiny_config(experiment={"rounds": ROUNDS})))
    fedguard.run(config, out=root / "full", progress=False)
    fedguard.run(config, out=root / "part", overrides=["experiment.rounds=3"], progress=False)
    kept = sorted(p.name for p in (root / "part" / "checkpoints").iterdir())
    assert kept == ["round_00002", "round_00003"]
    return {"config": config, "full": root / "full", "part": root / "part"}


@pytest.fixture
def part(runs, tmp_path) -> Path:
    """A private copy of the run stopped after round 3."""
    return Path(shutil.copytree(runs["part"], tmp_path / "part"))


def _redigest(folder: Path, **state_changes) -> None:
    """Rewrite ``state.json``'s digest (and apply ``state_changes``) as a forger would."""
    state = json.loads((folder / "state.json").read_text())
    state.update(state_changes)
    state["digest"]["tensors_sha256"] = hashlib.sha256(
        (folder / "tensors.safetensors").read_bytes()
    ).hexdigest()
    body = {k: v for k, v in state.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    state["digest"]["state_sha256"] = hashlib.sha256(canonical).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


def _set_params(folder: Path, value: float) -> None:
    tensors = load_file(str(folder / "tensors.safetensors"))
    tensors["params"] = torch.full_like(tensors["params"], value)
    save_file(tensors, str(folder / "tensors.safetensors"))


def _resume(runs, out: Path, caplog) -> dict:
    with caplog.at_level(logging.WARNING, logger="fedguard"):
        return fedguard.run(runs["config"], out=out, resume=True, progress=False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_same_as_uninterrupted(runs, part: Path, summary: dict) -> None:
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert _rows(part) == _rows(runs["full"])
    assert torch.equal(_params(part, ROUNDS), _params(runs["full"], ROUNDS))


def test_state_json_holds_the_digest_of_the_tensors_and_of_itself(part) -> None:
    folder = part / "checkpoints" / "round_00003"
    state = json.loads((folder / "state.json").read_text())
    digest = state.pop("digest")
    tensors = hashlib.sha256((folder / "tensors.safetensors").read_bytes()).hexdigest()
    assert digest["tensors_sha256"] == tensors
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    assert digest["state_sha256"] == hashlib.sha256(canonical).hexdigest()
    ck = checkpoint.latest(part / "checkpoints", max_round=ROUNDS)
    assert ck is not None and ck.round == 3 and "digest" not in ck.info


def test_a_copied_folder_named_round_99999_is_skipped(runs, part, caplog) -> None:
    ckpts = part / "checkpoints"
    shutil.copytree(ckpts / "round_00003", ckpts / "round_99999")
    summary = _resume(runs, part, caplog)
    assert any(
        "round_99999" in w and "says round 3 but the folder is round_99999" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)
    _assert_same_as_uninterrupted(runs, part, summary)
    assert not (ckpts / "round_99999").exists()  # the abandoned history is pruned


def test_a_forged_round_past_the_plan_is_skipped(runs, part, caplog) -> None:
    ckpts = part / "checkpoints"
    shutil.copytree(ckpts / "round_00003", ckpts / "round_99999")
    _redigest(ckpts / "round_99999", round=99999)
    assert checkpoint.latest(ckpts).round == 99999  # consistent in itself ...
    summary = _resume(runs, part, caplog)  # ... but past the plan's 4 rounds
    assert any(
        "round_99999" in w and "past the plan's experiment.rounds = 4" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)
    _assert_same_as_uninterrupted(runs, part, summary)


def test_edited_parameters_fall_back_to_the_previous_checkpoint(runs, part, caplog) -> None:
    _set_params(part / "checkpoints" / "round_00003", -5.0)
    summary = _resume(runs, part, caplog)
    warnings = _warnings(caplog)
    assert any("round_00003" in w and "does not match its digest" in w for w in warnings)
    assert any("falling back" in w and "round_00002" in w for w in warnings), warnings
    _assert_same_as_uninterrupted(runs, part, summary)


def test_nan_parameters_fall_back_even_with_a_matching_digest(runs, part, caplog) -> None:
    folder = part / "checkpoints" / "round_00003"
    _set_params(folder, float("nan"))
    _redigest(folder)
    summary = _resume(runs, part, caplog)
    assert any(
        "round_00003" in w and "'params' holds NaN or infinite values" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)
    _assert_same_as_uninterrupted(runs, part, summary)


def test_a_truncated_latest_checkpoint_falls_back(runs, part, caplog) -> None:
    tensors = part / "checkpoints" / "round_00003" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    summary = _resume(runs, part, caplog)
    assert any("round_00003" in w and "cut short" in w for w in _warnings(caplog))
    _assert_same_as_uninterrupted(runs, part, summary)


def test_a_truncated_state_json_falls_back(runs, part, caplog) -> None:
    state = part / "checkpoints" / "round_00003" / "state.json"
    state.write_text(state.read_text()[:20])
    summary = _resume(runs, part, caplog)
    assert any("round_00003" in w and "cannot be read" in w for w in _warnings(caplog))
    _assert_same_as_uninterrupted(runs, part, summary)


def test_no_usable_checkpoint_is_a_one_line_error_exit_2(runs, part, capsys) -> None:
    _set_params(part / "checkpoints" / "round_00003", -5.0)
    (part / "checkpoints" / "round_00002" / "state.json").unlink()
    rows_before = (part / "metrics.jsonl").read_text()
    code = cli.main(["run", str(runs["config"]), "--out", str(part), "--resume", "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and "no usable checkpoint" in lines[0], err
    assert "round_00003" in lines[0] and "round_00002: state.json is missing" in lines[0]
    assert "Traceback" not in err
    assert (part / "metrics.jsonl").read_text() == rows_before  # nothing ran


def test_a_checkpoint_without_a_digest_is_not_trusted(tmp_path) -> None:
    folder = tmp_path / "round_00001"
    folder.mkdir()
    save_file({"params": torch.zeros(3)}, str(folder / "tensors.safetensors"))
    (folder / "state.json").write_text(json.dumps({"round": 1}))
    with pytest.raises(ConfigError, match="round_00001: state.json has no digest"):
        checkpoint.latest(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_are_removed_when_a_run_starts(runs, part, caplog) -> None:
    ckpts = part / "checkpoints"
    stale = [ckpts / f".tmp-round_00004-{_dead_pid()}", ckpts / f".tmp-round_00004-{os.getpid()}"]
    live = ckpts / f".tmp-round_00004-{os.getppid()}"  # another live writer: left alone
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "tensors.safetensors").write_bytes(b"half a checkpo")
    summary = _resume(runs, part, caplog)
    assert not any(p.exists() for p in stale)
    assert live.exists()
    assert any("interrupted write" in w for w in _warnings(caplog))
    _assert_same_as_uninterrupted(runs, part, summary)
