"""The server killed with SIGKILL mid-run and restarted with --resume: clients reconnect by
themselves, every round runs exactly once, and the result equals an uninterrupted simulation."""

from __future__ import annotations

import json

import torch
from test_grpc_harness import (
    Behaviour,
    Federation,
    final_params,
    losses_match,
    make_security,
    wait_for,
    write_config,
)

import fedguard
from fedguard.experiment import checkpoint

ROUNDS = 8


def test_server_killed_and_resumed_runs_every_round_once(tmp_path) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        experiment={"rounds": ROUNDS},
        data={"num_clients": 4},
        server={"clients_per_round": 3, "min_clients": 3, "deadline_s": 20.0},
    )
    fed = Federation(config, tmp_path / "run", make_security(tmp_path / "sec", range(4)))
    try:
        fed.start_server()
        for cid in range(4):
            fed.start_client(cid, Behaviour.SLOW)

        def finished_round() -> int:
            ck = checkpoint.latest(fed.out / "checkpoints")
            return 0 if ck is None else ck.round

        wait_for(lambda: finished_round() >= 2, 90, "two finished rounds")
        fed.kill_server()
        killed_after = finished_round()
        assert killed_after < ROUNDS  # the kill really interrupted the run
        fed.start_server(resume=True)
        assert fed.wait_server(90) == 0
        assert set(fed.wait_clients(15).values()) == {0}  # they reconnected and finished
    finally:
        fed.stop()
    rows = fed.rows()
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert "resuming after round" in fed.log.read_text()
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    assert losses_match([r["test_loss"] for r in rows], [r["test_loss"] for r in sim_rows])
    (rd, pd), (rs, ps) = final_params(fed.out), final_params(simulated)
    assert rd == rs == ROUNDS and torch.equal(pd, ps)
