"""Five client processes, three rounds, TLS: the deployed run (its server holds no data; the
clients evaluate on their shares of the test split) equals the simulated one, and a wrong token
is refused without learning anything."""

from __future__ import annotations

import json

import grpc
import torch
from test_grpc_harness import (
    Federation,
    final_params,
    losses_match,
    make_security,
    raw_pull,
    wait_for,
    write_config,
)

import fedguard
from fedguard.runtime import auth

SECTIONS = {
    "data": {"num_clients": 5},
    "server": {"clients_per_round": 5, "min_clients": 3, "deadline_s": 30.0},
}


def test_five_tls_clients_equal_the_simulator_and_a_wrong_token_gets_nothing(tmp_path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    sec = make_security(tmp_path / "sec", range(5))
    fed = Federation(config, tmp_path / "deployed", sec)
    try:
        fed.start_server()
        for cid in range(5):
            fed.start_client(cid)
        wait_for(lambda: "serving 5 clients" in _text(fed.log), 60, "the server to listen")
        ca = (sec.directory / "ca.pem").read_bytes()
        code, chunks = raw_pull(fed.address, ca, auth.fresh_credentials(0, b"not-the-token"))
        assert (code, chunks) == (grpc.StatusCode.UNAUTHENTICATED, 0)
        code, chunks = raw_pull(fed.address, ca, auth.fresh_credentials(9, sec.token(0)))
        assert (code, chunks) == (grpc.StatusCode.UNAUTHENTICATED, 0)
        assert fed.wait_server(90) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    assert "authentication failed: client 0 sent a wrong token" in fed.log.read_text()
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    deployed_rows, simulated_rows = fed.rows(), _rows(simulated)
    assert [r["round"] for r in deployed_rows] == [1, 2, 3]
    keys = ("test_accuracy", "train_loss", "clients_completed", "bytes_up")
    for d, s in zip(deployed_rows, simulated_rows, strict=True):
        assert {k: d[k] for k in keys} == {k: s[k] for k in keys}
    loss = "test_loss"
    assert losses_match([r[loss] for r in deployed_rows], [r[loss] for r in simulated_rows])
    assert [r["clients_completed"] for r in deployed_rows] == [5, 5, 5]
    (rd, pd), (rs, ps) = final_params(fed.out), final_params(simulated)
    assert rd == rs == 3 and torch.equal(pd, ps)


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
