"""FedDyn, FedNova and Ditto deployed over gRPC (three client processes, two rounds) equal the
in-process run of the same config, client state included: FedDyn's ``g_k`` and Ditto's personal
model live on the clients, the server's ``h`` in its checkpoints. A client restarted between
rounds over its ``--state-dir`` continues with its personal model; a FedDyn or SCAFFOLD client
that trains and vanishes before its reply leaves, restarted over its state folder, answers its
open task again as if it had never trained.

As in ``test_grpc_round.py``: the deployed server holds no data, so its test loss is the
clients' losses added up (equal within :data:`~test_grpc_harness.LOSS_REL`); everything else,
the parameters and the server's state included, is equal bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_grpc_harness import (
    Behaviour,
    Federation,
    losses_match,
    make_security,
    wait_for,
    write_config,
)

import fedguard
from fedguard.client import personal
from fedguard.client.state_store import DiskState
from fedguard.experiment import checkpoint
from fedguard.protocol import features
from fedguard.protocol.strategy import AGGREGATED, FEDDYN_H

CLIENTS = 3
ROUNDS = 2
Sections = dict[str, dict[str, Any]]
BASE: Sections = {
    "experiment": {"rounds": ROUNDS},
    "data": {"num_clients": CLIENTS},
    "server": {"clients_per_round": CLIENTS, "min_clients": 2, "deadline_s": 30.0},
}
# Ditto: every client holds out 30 % of its own partition and evaluates both models on it
DITTO: Sections = {
    "data": {"num_clients": CLIENTS, "client_eval_fraction": 0.3},
    "evaluation": {"mode": "federated"},
    "personalization": {"method": "ditto", "epochs": 2, "ditto_lambda": 0.3},
}
EXACT = ("test_accuracy", "train_loss", "clients_completed", "clients_failed", "bytes_up")
PERSONAL = (
    "personal_accuracy_mean",
    "personal_accuracy_worst",
    "global_accuracy_mean",
    "global_accuracy_worst",
    "personal_clients",
)


def _config(tmp_path: Path, *extra: Sections) -> Path:
    sections = {name: dict(values) for name, values in BASE.items()}
    for more in extra:
        for name, values in more.items():
            sections.setdefault(name, {}).update(values)
    return write_config(tmp_path / "exp.toml", **sections)


def _deployed(config: Path, tmp_path: Path, states: Path | None = None) -> Federation:
    """The federation of ``config`` run to its end: the server and every client (each over
    ``states / client-<id>`` if given), all exiting 0."""
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(CLIENTS)))
    try:
        fed.start_server()
        for cid in range(CLIENTS):
            fed.start_client(cid, state_dir=None if states is None else states / f"client-{cid}")
        _finish(fed)
    finally:
        fed.stop()
    return fed


def _finish(fed: Federation) -> None:
    assert fed.wait_server(90) == 0
    assert set(fed.wait_clients(15).values()) == {0}


def _client_states(states: Path) -> dict[int, dict[str, torch.Tensor]]:
    """What each deployed client kept in its ``--state-dir`` (``states / client-<id>``)."""
    out = {}
    for cid in range(CLIENTS):
        kept = DiskState(states / f"client-{cid}")
        if cid in kept:
            out[cid] = kept[cid]
    return out


def _simulated_client_states(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The clients' state in the simulated run's last checkpoint (``client.<id>.<name>``)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _last(run_dir).items():
        if key.startswith("client."):
            _, cid, name = key.split(".", 2)
            out.setdefault(int(cid), {})[name] = value
    return out


def _assert_same_client_states(states: Path, simulated: Path, names: set[str]) -> None:
    """Every client kept the entries ``names`` on its disk, equal to the simulated run's."""
    deployed, reference = _client_states(states), _simulated_client_states(simulated)
    assert deployed.keys() == reference.keys() == set(range(CLIENTS))
    for cid, named in reference.items():
        assert named.keys() == deployed[cid].keys() and names <= named.keys()
        for name, value in named.items():
            assert torch.equal(deployed[cid][name], value), (cid, name)


def _last(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = checkpoint.latest(run_dir / "checkpoints")
    assert ck is not None and ck.round == ROUNDS
    return ck.tensors


def _assert_same_runs(deployed: Federation, simulated: Path) -> list[dict[str, Any]]:
    """The deployed run's rows and final checkpoint equal the simulated run's; its rows."""
    rows = deployed.rows()
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [r["round"] for r in sim_rows] == [1, 2]
    for d, s in zip(rows, sim_rows, strict=True):
        assert {k: d[k] for k in EXACT} == {k: s[k] for k in EXACT}
        assert d["clients_completed"] == CLIENTS
    assert losses_match([r["test_loss"] for r in rows], [r["test_loss"] for r in sim_rows])
    d_ck, s_ck = _last(deployed.out), _last(simulated)
    assert torch.equal(d_ck["params"], s_ck["params"])
    server = sorted(k for k in d_ck if k.startswith("server."))
    assert server == sorted(k for k in s_ck if k.startswith("server."))
    for key in server:
        assert torch.equal(d_ck[key], s_ck[key]), key
    return rows


@pytest.mark.parametrize(
    ("server", "client"),
    [
        ({"strategy": "feddyn", "feddyn_alpha": 0.1}, {}),
        ({"strategy": "fednova"}, {"momentum": 0.5}),
    ],
    ids=["feddyn", "fednova"],
)
def test_feddyn_and_fednova_deployed_equal_the_simulator(tmp_path, server, client) -> None:
    config = _config(tmp_path, {"server": server, "client": client})
    fed = _deployed(config, tmp_path, tmp_path / "states")
    fedguard.run(config, out=tmp_path / "simulated", progress=False)
    _assert_same_runs(fed, tmp_path / "simulated")
    if server["strategy"] == "feddyn":
        h = _last(fed.out)["server." + FEDDYN_H]
        assert float(h.abs().sum()) > 0  # h moved, and moved as in simulation
        # each client's g_k (committed and pending) on its disk, as the simulator's checkpoint
        gradient = {features.FEDDYN_GRADIENT, features.FEDDYN_PENDING, features.FEDDYN_ROUNDS}
        _assert_same_client_states(tmp_path / "states", tmp_path / "simulated", gradient)
    else:  # FedNova keeps no client state
        assert _client_states(tmp_path / "states") == {}


def test_ditto_deployed_equals_the_simulator_with_its_personal_evaluation(tmp_path) -> None:
    config = _config(tmp_path, DITTO)
    fed = _deployed(config, tmp_path, tmp_path / "states")
    simulated = tmp_path / "simulated"
    summary = fedguard.run(config, out=simulated, progress=False)
    rows = _assert_same_runs(fed, simulated)
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(rows, sim_rows, strict=True):
        assert {k: d[k] for k in PERSONAL} == {k: s[k] for k in PERSONAL}
        assert [c["client"] for c in d["personal_clients"]] == list(range(CLIENTS))
    deployed_summary = json.loads((fed.out / "summary.json").read_text())
    for key in ("personalization", *PERSONAL[:4]):
        assert deployed_summary[key] == summary[key], key
    assert summary["personalization"] == "ditto"
    # the personal models are not the global one: Ditto's evaluation measured something
    last = rows[-1]["personal_clients"]
    assert any(c["personal_loss"] != c["global_loss"] for c in last)

    # each client's personal model, kept in its state folder, is the simulated client's
    _assert_same_client_states(tmp_path / "states", simulated, {personal.STATE})


# Seed 9 with alpha 0.05 deals client 0 one training example: 30 % of it holds out none, so
# the client evaluates on its share of the test split, not on held-out data of its own.
TINY_CLIENT: Sections = {
    "experiment": {"seed": 9},
    "data": {"alpha": 0.05, "synthetic_samples": 300},
}


def test_a_client_too_small_to_hold_out_is_left_out_of_personal_evaluation_alike(
    tmp_path,
) -> None:
    """The same clients count in the personal evaluation deployed as in simulation: client 0,
    too small to hold out a split of its own, answers the personal task "no held-out data of
    its own" and neither server counts it in the mean, the worst client or the per-client
    entries; it still takes part in training and in the federated evaluation."""
    config = _config(tmp_path, DITTO, TINY_CLIENT)
    fed = _deployed(config, tmp_path)
    simulated = tmp_path / "simulated"
    summary = fedguard.run(config, out=simulated, progress=False)
    sizes = json.loads((simulated / "partition.json").read_text())["clients"]
    assert sizes[0]["num_samples"] == 1  # the case this test is about
    rows = _assert_same_runs(fed, simulated)
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(rows, sim_rows, strict=True):
        assert [c["client"] for c in s["personal_clients"]] == [1, 2]
        assert [c["client"] for c in d["personal_clients"]] == [1, 2]
        assert {k: d[k] for k in PERSONAL} == {k: s[k] for k in PERSONAL}
    deployed_summary = json.loads((fed.out / "summary.json").read_text())
    for key in ("personalization", *PERSONAL[:4]):
        assert deployed_summary[key] == summary[key], key


def _restart(fed: Federation, cid: int, marker: Path, states: Path, *, code: int) -> None:
    """Wait for client ``cid`` to leave (its ``marker`` written, its process gone with exit
    code ``code``), then start it again over the same state folder."""
    wait_for(marker.exists, 60, f"client {cid} to leave")
    old = fed.clients[cid]
    old.join(30)
    assert old.exitcode == code
    fed.start_client(cid, state_dir=states / f"client-{cid}")


def _run_restarting_client_1(
    config: Any, tmp_path: Any, states: Any, behaviour: Any, *, code: int
) -> tuple[Federation, Any]:
    """A deployed run whose clients keep state under ``states``; client 1 behaves as
    ``behaviour``, exits with ``code`` and is started again over its state folder. Returns
    the federation (stopped) and client 1's marker file."""
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(CLIENTS)))
    try:
        fed.start_server()
        for cid in (0, 2):
            fed.start_client(cid, state_dir=states / f"client-{cid}")
        marker = fed.start_client(1, behaviour, states / "client-1")
        _restart(fed, 1, marker, states, code=code)
        _finish(fed)
    finally:
        fed.stop()
    return fed, marker


def test_a_deployed_clients_ditto_model_survives_its_restart(tmp_path) -> None:
    """Client 1 stops after answering round 1 and starts again over its --state-dir: its
    round-1 personal model is evaluated and trained on in round 2 as if it had not stopped."""
    config = _config(tmp_path, DITTO)
    states = tmp_path / "states"
    fed, marker = _run_restarting_client_1(
        config, tmp_path, states, Behaviour.STOP_AFTER_ROUND_1, code=0
    )
    assert marker.read_text() == "stopped"
    simulated = tmp_path / "simulated"
    fedguard.run(config, out=simulated, progress=False)
    rows = _assert_same_runs(fed, simulated)
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(rows, sim_rows, strict=True):
        assert {k: d[k] for k in PERSONAL} == {k: s[k] for k in PERSONAL}
    _assert_same_client_states(states, simulated, {personal.STATE})


@pytest.mark.parametrize(
    ("server", "names"),
    [
        ({"strategy": "feddyn", "feddyn_alpha": 0.1}, features.FEDDYN_STATE),
        ({"strategy": "scaffold", "server_lr": 0.7}, features.SCAFFOLD_STATE),
    ],
    ids=["feddyn", "scaffold"],
)
def test_a_client_that_vanishes_after_training_answers_its_task_again_as_before(
    tmp_path, server: dict[str, Any], names: features.CommittedState
) -> None:
    """Client 1 trains on round 1's task and exits before its reply leaves: its new FedDyn
    ``g_k`` or SCAFFOLD ``c_i`` is on its disk, pending. Started again over its --state-dir, it
    fetches the same open task and, the server's record saying nothing of round 1, trains from
    the state it had before: the run equals the uninterrupted simulation (model, the server's
    ``h`` or ``c`` and its record), the clients' committed and pending states included."""
    config = _config(tmp_path, {"server": server})
    states = tmp_path / "states"
    fed, marker = _run_restarting_client_1(
        config, tmp_path, states, Behaviour.VANISH_AFTER_TRAINING_1, code=17
    )
    assert marker.read_text() == "vanished"
    fedguard.run(config, out=tmp_path / "simulated", progress=False)
    _assert_same_runs(fed, tmp_path / "simulated")
    _assert_same_client_states(
        states, tmp_path / "simulated", {names.committed, names.pending, names.rounds}
    )
    # round 2 started from the state round 1 committed: every client's delta entered the server
    ck = _last(fed.out)
    assert ck["server." + AGGREGATED].tolist() == [ROUNDS] * CLIENTS
    for cid, named in _client_states(states).items():
        assert named[names.rounds].tolist() == [1, ROUNDS], cid
