"""Asynchronous rounds (FedBuff) on a deployed server: client processes over gRPC, tasks
dispatched one at a time through the server's reply stream. With one client training at a time
the dispatch order is the seeded one, so the deployed run equals the simulated one exactly."""

from __future__ import annotations

import json

import torch
from test_grpc_harness import (
    Behaviour,
    Federation,
    final_params,
    make_security,
    wait_for,
    write_config,
)

import fedguard

SECTIONS = {
    "experiment": {"rounds": 4},
    "data": {"num_clients": 4},
    "server": {
        "mode": "async",
        "concurrency": 1,
        "buffer_size": 2,
        "clients_per_round": 4,
        "deadline_s": 30.0,
    },
}


def test_deployed_async_run_equals_the_simulated_one(tmp_path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(4)))
    try:
        fed.start_server()
        for cid in range(4):
            fed.start_client(cid)
        wait_for(lambda: fed.log.exists(), 60, "the server to start")
        assert fed.wait_server(120) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    sim = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    dep = fed.rows()
    assert [r["round"] for r in dep] == [1, 2, 3, 4]
    keys = ("clients_completed", "clients_sampled", "staleness_max", "bytes_up", "train_loss")
    for d, s in zip(dep, sim, strict=True):
        assert {k: d[k] for k in keys} == {k: s[k] for k in keys}
    # the deployed clock is wall time: it only grows
    clock = [r["simulated_seconds"] for r in dep]
    assert clock == sorted(clock) and clock[0] > 0
    (rd, pd), (rs, ps) = final_params(fed.out), final_params(simulated)
    assert rd == rs == 4 and torch.equal(pd, ps)


def test_deployed_async_run_with_clients_at_once_and_federated_evaluation(tmp_path) -> None:
    """Three clients training at once, one of them slow, and every round evaluated by the
    clients while fit tasks are out (a client takes its open tasks in turn)."""
    sections = {**SECTIONS, "server": {**SECTIONS["server"], "concurrency": 3}}
    config = write_config(tmp_path / "exp.toml", **sections)
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(4)))
    try:
        fed.start_server()
        fed.start_client(0, Behaviour.SLOW)
        for cid in range(1, 4):
            fed.start_client(cid)
        assert fed.wait_server(120) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    rows = fed.rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(r["clients_completed"] == 2 and r["clients_failed"] == 0 for r in rows)
    assert all(r["test_accuracy"] is not None for r in rows)  # the clients evaluated each round
    assert sum(r["clients_sampled"] for r in rows) >= 4 * 2 + 1  # more than one out at a time
