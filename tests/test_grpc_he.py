"""Aggregation under homomorphic encryption over the network: clients provisioned with the key
file of ``fedguard he-keys``, a server with only the key-less parameter file; the deployed run
equals the simulated one exactly (BFV sums are exact and the rounding is seeded per client and
round, so the tolerance is zero)."""

from __future__ import annotations

import torch
from test_grpc_harness import Federation, final_params, make_security, write_config

from conftest import driven_params
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.runtime import he_keys

SECTIONS = {
    "experiment": {"rounds": 2},
    "data": {"num_clients": 4},
    "server": {"clients_per_round": 4, "min_clients": 3, "deadline_s": 20.0},
    "secure_aggregation": {"enabled": True, "mode": "ckks", "he_scheme": "bfv", "clip_norm": 1.0},
    "evaluation": {"every": 0},
}


def test_a_deployed_he_run_equals_the_simulated_run(tmp_path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    sec = make_security(tmp_path / "sec", range(4))
    he_keys.make_keys(sec.directory, "bfv")
    fed = Federation(config, tmp_path / "run", sec)
    try:
        fed.start_server()
        for cid in range(4):
            fed.start_client(cid)
        assert fed.wait_server(120) == 0
    finally:
        fed.stop()
    rows = fed.rows()
    assert [r["clients_completed"] for r in rows] == [4, 4]
    assert all("secure_aggregation_aborted" not in r for r in rows)
    assert "HE sum of 4 clients (bfv) decrypted by 2 client(s)" in fed.log.read_text()
    exp = Experiment(config_mod.load(config))
    params = driven_params(exp, 2)
    round_, deployed = final_params(fed.out)
    assert round_ == 2 and torch.equal(deployed, params)
    assert not torch.equal(deployed, exp.initial_params)
    # the server's file decrypts nothing; the run folder holds no key
    assert not list(fed.out.rglob("*.key"))
