"""Secure aggregation over the network: a client process that dies after sending its masked
input (it exits when asked to unmask) leaves the sum exact; the round equals the simulator's
round with that client dropped at the same phase."""

from __future__ import annotations

import torch
from test_grpc_harness import Behaviour, Federation, final_params, make_security, write_config

from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.protocol.secagg import Phase
from fedguard.simulation.dropout import PhaseDropout

SECTIONS = {
    "experiment": {"rounds": 1},
    "data": {"num_clients": 5},
    "server": {"clients_per_round": 5, "min_clients": 3, "deadline_s": 5.0},
    "secure_aggregation": {"enabled": True, "clip_norm": 1.0, "bits": 64},
}
VANISHING = 2


def test_secure_aggregation_survives_a_client_dying_after_masking(tmp_path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    fed = Federation(config, tmp_path / "run", make_security(tmp_path / "sec", range(5)))
    try:
        fed.start_server()
        markers = {
            cid: fed.start_client(
                cid, Behaviour.VANISH_AT_UNMASK if cid == VANISHING else Behaviour.NORMAL
            )
            for cid in range(5)
        }
        assert fed.wait_server(90) == 0
        exits = fed.wait_clients(15)
    finally:
        fed.stop()
    assert markers[VANISHING].exists() and exits[VANISHING] == 17
    assert {exits[c] for c in range(5) if c != VANISHING} == {0}
    [row] = fed.rows()
    assert "secure_aggregation_aborted" not in row
    assert "unmask: client 2 dropped: timeout" in fed.log.read_text()
    exp = Experiment(config_mod.load(config))
    exp.driver.transport = PhaseDropout(exp.transport, {Phase.UNMASK: {VANISHING}})
    simulated = exp.driver.fit_round(1, exp.initial_params, exp.strategy.init(exp.initial_params))
    assert simulated.metrics["clients_completed"] == row["clients_completed"]
    round_, deployed = final_params(fed.out)
    assert round_ == 1 and torch.equal(deployed, simulated.params)
    assert not torch.equal(deployed, exp.initial_params)
