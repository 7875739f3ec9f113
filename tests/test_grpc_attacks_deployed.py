"""Deployed runs (a real server and client processes over gRPC with TLS) against one scripted
malicious client: a claim of 10^12 examples, a finite 3e38 update, an all-zero X25519 key.

The same attacks are tested through the in-process transport in ``test_weight_attacks.py`` and
``test_secagg_malicious_server.py``; here they arrive as bytes over the network, pass the gRPC
transport's own checks (each reply is well-formed, finite and of the right size) and must be
caught by the round driver and the secure-aggregation server behind it. Each run completes its
rounds, and each test compares the deployed run with a simulated one (a deployed run equals the
simulator's run bit for bit, ``test_grpc_round.py``): a control without the attacker, and where
the protection makes the attack equivalent to something harmless, that harmless run exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_grpc_harness import CTX, Federation, Security, final_params, make_security, write_config

import fedguard
from conftest import metric_rows
from fedguard.experiment import assembly
from fedguard.experiment import config as config_mod
from fedguard.protocol import messages
from fedguard.protocol.secagg import Phase
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

CLIENTS = 5
LIAR = 2
ROUNDS = 3
CHANCE = 1 / 3  # three balanced synthetic classes
BASE = {
    "experiment": {"rounds": ROUNDS},
    "data": {"num_clients": CLIENTS},
    "server": {"clients_per_round": CLIENTS, "min_clients": 3, "deadline_s": 30.0},
}
# The deployed run's final test accuracy may trail the control's (all five clients honest) by
# at most this: the attacker's update is cut out or outvoted, so at worst one client's worth of
# training is missing. On this task the control reaches 1.0.
MARGIN = 0.05


@dataclass(frozen=True)
class Lie:
    """What the malicious client changes in its honest replies (picklable: it travels to the
    client process)."""

    scale: float | None = None  # the fit update times this
    fill: float | None = None  # every coordinate of the fit update set to this
    claim: int | None = None  # the number of examples the fit reply claims
    zero_key: bool = False  # advertise the all-zero X25519 point as the key ``c``

    def apply(self, message: Any) -> Any:
        """``message`` as the malicious client sends it."""
        if isinstance(message, messages.FitReply):
            update = message.update
            if self.scale is not None:
                update = self.scale * update
            if self.fill is not None:
                update = torch.full_like(update, self.fill)
            claim = message.num_examples if self.claim is None else self.claim
            return replace(message, update=update, num_examples=claim)
        if isinstance(message, messages.SecAggKeys) and self.zero_key:
            return replace(message, c_public=bytes(32))
        return message


def liar_main(config: Path, address: str, client_id: int, sec: Security, lie: Lie) -> None:
    """A deployed client process that trains honestly on its partition and rewrites each reply
    with ``lie`` before it is pushed."""
    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.runtime import grpc_client

    torch.set_num_threads(1)
    app = grpc_deploy.demo_app(config, client_id)

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(lie.apply(messages.decode(app.handle(cid, payload))))

    settings = grpc_client.ClientSettings(
        address,
        client_id,
        sec.token(client_id),
        sec.client_tls(client_id),
        backoff_max_s=1.0,
        give_up_after_s=60.0,
    )
    grpc_client.serve(settings, handler)


def _deploy(tmp_path: Path, config: Path, lie: Lie) -> tuple[Path, dict]:
    """Run ``config`` deployed with client :data:`LIAR` lying as ``lie``: the run folder and the
    server's log text. Every process must exit cleanly."""
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(CLIENTS)))
    try:
        fed.start_server()
        for cid in range(CLIENTS):
            if cid == LIAR:
                args = (config, fed.address, cid, fed.sec, lie)
                fed.clients[cid] = CTX.Process(target=liar_main, args=args, daemon=True)
                fed.clients[cid].start()
            else:
                fed.start_client(cid)
        assert fed.wait_server(120) == 0, fed.log.read_text()[-3000:]
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    summary = json.loads((fed.out / "summary.json").read_text())
    return fed.out, summary


def _simulate(
    monkeypatch: pytest.MonkeyPatch,
    config: Path,
    out: Path,
    *,
    lie: Lie | None = None,
    drop_at_advertise: bool = False,
) -> dict:
    """``config`` in the simulator, with client :data:`LIAR` lying as ``lie`` or (secure
    aggregation) dropping out before it advertises its keys; the run's summary."""
    real = assembly.Experiment.__init__

    def init(self: assembly.Experiment, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        honest = self.app.handle

        def handler(cid: int, payload: bytes) -> bytes:
            reply = honest(cid, payload)
            if lie is None or cid != LIAR:
                return reply
            return messages.encode(lie.apply(messages.decode(reply)))

        transport = InProcessTransport(handler, self.transport.client_ids)
        drops = {Phase.ADVERTISE: {LIAR}} if drop_at_advertise else {}
        self.driver.transport = PhaseDropout(transport, drops)

    with monkeypatch.context() as m:
        m.setattr(assembly.Experiment, "__init__", init)
        return fedguard.run(config, out=out, progress=False)


# ---- (a) a client claiming 10^12 examples -------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregator", "equivalent_claim"),
    [("mean", None), ("geometric_median", 1)],
    ids=["mean", "geometric_median"],
)
def test_a_deployed_client_claiming_a_trillion_examples_gets_no_more_weight(
    aggregator: str, equivalent_claim: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The liar sends its update sign-flipped and claims 10^12 examples. Taken at face value the
    claim makes the aggregate the liar's update (the mean, and the weighted geometric median,
    walk backwards: accuracy 0). The mean caps the claim at the liar's registered size, so the
    run is bit for bit the run in which it claims what it holds (``equivalent_claim`` None); the
    geometric median weighs every update equally, so the run is bit for bit the run in which it
    claims a single example."""
    server = {} if aggregator == "mean" else {"aggregator": aggregator, "byzantine_f": 1}
    config = write_config(tmp_path / "exp.toml", **{**BASE, "server": {**BASE["server"], **server}})
    out, summary = _deploy(tmp_path, config, Lie(scale=-1.0, claim=10**12))

    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    rows = metric_rows(out)
    assert [r["weights_capped"] for r in rows] == [1] * ROUNDS
    assert [r["clients_completed"] for r in rows] == [CLIENTS] * ROUNDS
    assert [r["clients_rejected"] for r in rows] == [0] * ROUNDS
    log = (out / "run.log").read_text()
    assert log.count(f"client {LIAR} claims 1000000000000 examples, more than its registered") == (
        ROUNDS
    )

    control = _simulate(monkeypatch, config, tmp_path / "control")
    assert control["test_accuracy"] >= 0.95
    assert summary["test_accuracy"] >= control["test_accuracy"] - MARGIN, summary["test_accuracy"]
    assert summary["test_accuracy"] >= 0.9  # chance is 1/3

    harmless = Lie(scale=-1.0, claim=equivalent_claim)
    _simulate(monkeypatch, config, tmp_path / "harmless", lie=harmless)
    deployed_round, deployed = final_params(out)
    _, equivalent = final_params(tmp_path / "harmless")
    assert deployed_round == ROUNDS and torch.equal(deployed, equivalent)


# ---- (b) one finite 3e38 update ----------------------------------------------------------------


def test_a_deployed_client_sending_a_finite_3e38_update_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every coordinate 3e38 is finite float32, so the transport accepts the reply; the driver's
    norm check (more than 10^4 times the round's median norm) rejects it in each round, and the
    plain mean of the four others trains as the control does."""
    config = write_config(tmp_path / "exp.toml", **BASE)
    out, summary = _deploy(tmp_path, config, Lie(fill=3e38))

    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert summary["clients_rejected"] == ROUNDS
    rows = metric_rows(out)
    assert [r["clients_rejected"] for r in rows] == [1] * ROUNDS
    assert [r["clients_completed"] for r in rows] == [CLIENTS - 1] * ROUNDS
    assert [r["aggregate_rejected"] for r in rows] == [None] * ROUNDS
    log = (out / "run.log").read_text()
    assert log.count(f"client {LIAR} rejected: update norm") == ROUNDS
    assert "times the round's median update norm" in log
    _, params = final_params(out)
    assert torch.isfinite(params).all() and float(params.abs().max()) < 100.0

    control = _simulate(monkeypatch, config, tmp_path / "control")
    assert control["test_accuracy"] >= 0.95
    assert summary["test_accuracy"] >= control["test_accuracy"] - MARGIN, summary["test_accuracy"]
    assert summary["test_accuracy"] >= 0.9  # chance is 1/3


# ---- (c) an all-zero X25519 key under secure aggregation ---------------------------------------


def test_a_deployed_client_advertising_an_all_zero_key_is_dropped_and_the_rest_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An all-zero ``c`` key would give every neighbour a known (zero) shared secret, and the
    neighbours' key agreement refuses it: kept, it would fail the round for everyone. Refused at
    the advertise phase it is that client's dropout; the four others (threshold 3 of 5) finish
    every round, and the run is bit for bit the simulated run in which the liar drops out before
    it advertises."""
    sections = {**BASE, "secure_aggregation": {"enabled": True, "clip_norm": 1.0, "bits": 64}}
    config = write_config(tmp_path / "exp.toml", **sections)
    out, summary = _deploy(tmp_path, config, Lie(zero_key=True))

    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert summary["rounds_aborted"] == 0
    rows = metric_rows(out)
    assert [r["clients_completed"] for r in rows] == [CLIENTS - 1] * ROUNDS
    assert not any(r.get("secure_aggregation_aborted") for r in rows)
    log = (out / "run.log").read_text()
    dropped = f"secure aggregation advertise: client {LIAR} dropped: invalid advertised key"
    assert log.count(dropped) == ROUNDS
    assert summary["test_accuracy"] >= 0.9  # chance is 1/3

    _simulate(monkeypatch, config, tmp_path / "dropped", drop_at_advertise=True)
    (round_, deployed), (_, simulated) = final_params(out), final_params(tmp_path / "dropped")
    assert round_ == ROUNDS and torch.equal(deployed, simulated)
    initial = assembly.Experiment(config_mod.load(config)).initial_params
    assert float((deployed - initial).norm()) > 0.1
