"""Mutual TLS end to end: the server admits only certificates of its client CA whose name is the
claimed client id. A certificate from another CA, no certificate, or a genuine certificate of
another client gets no model; the genuine clients complete a round equal to the simulator's."""

from __future__ import annotations

from pathlib import Path

import grpc
import torch
from test_grpc_harness import (
    Federation,
    final_params,
    make_security,
    raw_pull,
    wait_for,
    write_config,
)

import fedguard
from fedguard.runtime import auth, certs


def _pull(
    address: str, ca: Path, client_id: int, cert: Path | None, key: Path | None
) -> tuple[grpc.StatusCode, int]:
    """A raw Pull as ``client_id`` presenting ``cert``: its status and the chunks received."""
    return raw_pull(
        address,
        ca.read_bytes(),
        auth.fresh_credentials(client_id, b""),
        cert=None if cert is None else cert.read_bytes(),
        key=None if key is None else key.read_bytes(),
    )


def test_mutual_tls_admits_only_the_right_certificate(tmp_path) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        experiment={"rounds": 1},
        data={"num_clients": 2},
        server={"clients_per_round": 2, "min_clients": 2, "deadline_s": 30.0},
    )
    sec = make_security(tmp_path / "sec", range(2), mutual=True)
    d = sec.directory
    other = certs.make_dev_pki(tmp_path / "other-ca", client_ids=[0])
    other_cert, other_key = other.client_certs[0]
    fed = Federation(config, tmp_path / "run", sec)
    try:
        fed.start_server()
        wait_for(lambda: "serving 2 clients" in _text(fed.log), 60, "the server to listen")
        ca = d / "ca.pem"
        # Client 0's name, signed by another CA: the TLS handshake fails.
        assert _pull(fed.address, ca, 0, other_cert, other_key) == (
            grpc.StatusCode.UNAVAILABLE,
            0,
        )
        # No client certificate at all: the handshake fails too.
        assert _pull(fed.address, ca, 0, None, None) == (grpc.StatusCode.UNAVAILABLE, 0)
        # Client 1's genuine certificate claiming to be client 0: refused after the handshake.
        own = (d / "client-1.pem", d / "client-1.key")
        assert _pull(fed.address, ca, 0, *own) == (grpc.StatusCode.UNAUTHENTICATED, 0)
        fed.start_client(0)
        fed.start_client(1)
        assert fed.wait_server(60) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    log = fed.log.read_text()
    assert "certificate 'fedguard-client-1' does not belong to client 0" in log
    assert log.count("refused (UNAUTHENTICATED)") == 1
    [row] = fed.rows()
    assert row["clients_completed"] == 2 and row["clients_failed"] == 0
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    (rd, pd), (rs, ps) = final_params(fed.out), final_params(simulated)
    assert rd == rs == 1 and torch.equal(pd, ps)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""
