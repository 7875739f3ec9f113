"""The command line: exit codes and messages a user sees."""

from __future__ import annotations

import json
import subprocess
import sys

import tomli_w

from conftest import tiny_config


def _fedguard(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nstrategy = "fedavx"\n')
    for command in ("validate", "run"):
        proc = _fedguard(command, str(path), cwd=tmp_path)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "server.strategy" in lines[0], proc.stderr


def test_partition_with_fewer_samples_than_clients_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(tiny_config(data={"num_clients": 50, "synthetic_samples": 40})))
    proc = _fedguard("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.partition" in proc.stderr and "num_clients=50" in proc.stderr


def test_validate_then_run_with_set_override(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(tiny_config()))
    proc = _fedguard("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 0 and "valid" in proc.stdout
    out = tmp_path / "run"
    proc = _fedguard(
        "run", str(path), "--out", str(out), "--set", "experiment.rounds=2", "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "round" not in proc.stdout + proc.stderr  # --quiet: no progress bar
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "rounds = 2" in (out / "config.toml").read_text()
    proc = _fedguard("run", str(path), "--out", str(out), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr
