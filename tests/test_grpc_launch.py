"""``fedguard launch`` end to end: a server and three client processes over TLS with throwaway dev
certificates run two rounds that equal the simulator's, and leave no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_grpc_harness import final_params, losses_match, write_config

import fedguard
from fedguard.experiment import config as config_mod
from fedguard.experiment import deployment as grpc_deploy

LAUNCH_TIMEOUT_S = 120.0


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in ticks) of ``pid`` from ``/proc``, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may contain spaces and ")"
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid to its start time (which tells a reused pid)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (st[0], st[2])
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _running(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        st = _stat(int(entry.name))
        if text in cmdline and st is not None and st[1] != "Z":
            out.append(int(entry.name))
    return out


def test_launch_three_tls_clients_equals_the_simulator_and_leaves_no_process(tmp_path) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        experiment={"rounds": 2},
        data={"num_clients": 3},
        server={"clients_per_round": 3, "min_clients": 3},
    )
    out = tmp_path / "deployed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fedguard.cli", "launch", str(config), "--clients", "3"]
    launch = subprocess.Popen(
        [*command, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[int, int] = {}
    try:
        end = time.monotonic() + LAUNCH_TIMEOUT_S
        while launch.poll() is None:
            assert time.monotonic() < end, f"launch did not finish in {LAUNCH_TIMEOUT_S} s"
            seen.update(_descendants(launch.pid))
            time.sleep(0.2)
        output = launch.stdout.read() if launch.stdout else ""
    finally:
        for pid, start in [*seen.items(), (launch.pid, 0)]:
            if pid == launch.pid or _running(pid, start):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        launch.wait(10)
    assert launch.returncode == 0, output
    # The server and the three clients, each seen running, none running now.
    assert len(seen) == 4, (seen, output)
    assert [pid for pid, start in seen.items() if _running(pid, start)] == []
    assert _processes_naming(str(config)) == []
    assert "the run is finished (" in output  # every client was told the run ended
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["clients_completed"] for r in rows] == [3, 3]
    # A config without server.deadline_s runs deployed with the stated default, on record.
    saved = config_mod.load(out / "config.toml")
    assert saved.server.deadline_s == grpc_deploy.DEFAULT_ROUND_DEADLINE_S == 120.0
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    assert losses_match([r["test_loss"] for r in rows], [r["test_loss"] for r in sim_rows])
    (rd, pd), (rs, ps) = final_params(out), final_params(simulated)
    assert rd == rs == 2 and torch.equal(pd, ps)
