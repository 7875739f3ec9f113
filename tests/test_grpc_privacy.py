"""Differential privacy over the network: a deployed run with central DP (noise added by the
server) and one with local DP-SGD (noise added inside each client process) report the same
epsilon per round and in the summary, and end with the same parameters, as the simulated run
with the same seed."""

from __future__ import annotations

import json

import pytest
import torch
from test_grpc_harness import Federation, final_params, losses_match, make_security, write_config

import fedguard

PRIVACY = {
    "central": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3},
    "local": {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3},
}


@pytest.mark.parametrize("mode", ["central", "local"])
def test_deployed_dp_run_reports_the_simulated_epsilon_and_parameters(tmp_path, mode) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        experiment={"rounds": 2},
        data={"num_clients": 3},
        server={"clients_per_round": 3, "min_clients": 3, "deadline_s": 30.0},
        privacy=PRIVACY[mode],
    )
    fed = Federation(config, tmp_path / "deployed", make_security(tmp_path / "sec", range(3)))
    try:
        fed.start_server()
        for cid in range(3):
            fed.start_client(cid)
        assert fed.wait_server(60) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    simulated = tmp_path / "simulated"
    sim_summary = fedguard.run(config, out=simulated, progress=False)
    rows = fed.rows()
    sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rows]
    assert len(epsilons) == 2 and all(e is not None and e > 0 for e in epsilons)
    assert epsilons[1] > epsilons[0]  # the budget grows with each round
    assert epsilons == [r["epsilon"] for r in sim_rows]
    assert losses_match([r["test_loss"] for r in rows], [r["test_loss"] for r in sim_rows])
    summary = json.loads((fed.out / "summary.json").read_text())
    assert (summary["epsilon"], summary["delta"]) == (sim_summary["epsilon"], 1e-3)
    assert summary["epsilon"] == epsilons[-1]
    (rd, pd), (rs, ps) = final_params(fed.out), final_params(simulated)
    assert rd == rs == 2 and torch.equal(pd, ps)
    # The noise is real: the same run without DP ends elsewhere.
    plain = tmp_path / "plain"
    fedguard.run(config, out=plain, overrides=["privacy.mode=off"], progress=False)
    assert not torch.allclose(final_params(plain)[1], pd, atol=1e-3)
