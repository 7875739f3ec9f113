"""The command line: exit codes and messages a user sees.

Each command runs in a process of its own (its exit code, its standard output and error): one
through ``python -m fedguard.cli`` in a fresh interpreter, the others through ``cli.main`` in
a process forked from the gRPC tests' interpreter that has torch and fedguard imported, which
saves each about 5 s of imports on two busy cores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import tomli_w
from test_grpc_harness import CliResult, run_cli

from conftest import tiny_config


def _fedguard(*args: str, cwd) -> CliResult:
    """``fedguard ARGS`` run from ``cwd`` in a process of its own, to its end."""
    return run_cli(*args, cwd=cwd)


def _python_m_fedguard(*args: str, cwd) -> subprocess.CompletedProcess:
    """``python -m fedguard.cli ARGS`` in a fresh interpreter, to its end."""
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
    # validate in a fresh interpreter (the module's entry point), run in a forked one
    for run, command in ((_python_m_fedguard, "validate"), (_fedguard, "run")):
        proc = run(command, str(path), cwd=tmp_path)
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
