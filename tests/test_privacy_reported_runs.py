"""Local DP composes what the clients' DP-SGD ran, as their fit replies report it.

A deployed client holds its own data, whose size the server's copy of the partition does not
know: its sampling rate and steps are its own. The run's epsilon must be that of the rates and
steps the clients ran, recomputed here with dp-accounting from the real data sizes; a reply that
ran less noise than the plan is refused, and the budget check uses the same history.
"""

from __future__ import annotations

import json
import logging

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

import fedguard
from conftest import tiny_config
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.experiment import assembly, checkpoint
from fedguard.experiment import config as config_mod
from fedguard.protocol import messages
from fedguard.simulation.inprocess import InProcessTransport

Z, DELTA, BATCH, EPOCHS = 1.1, 1e-3, 16, 3
LOCAL = {"mode": "local", "noise_multiplier": Z, "max_grad_norm": 1.0, "delta": DELTA}
DEPLOYED = 0  # the client whose own data differs from the server's copy of its partition
REAL_ROWS = 20  # it holds 20 rows: q = 16 / 20 = 0.8, max(1, round(20 / 16)) = 1 step an epoch


def _config(**sections: dict) -> dict:
    base: dict[str, dict] = {
        "client": {"epochs": EPOCHS, "batch_size": BATCH},
        "server": {"clients_per_round": 6, "min_clients": 4},  # every client, every round
        "privacy": LOCAL,
    }
    return tiny_config(**{**base, **sections})


def _dp_sgd_epsilon(q: float, steps: int, z: float = Z) -> float:
    """dp-accounting's RDP epsilon of ``steps`` Poisson-sampled Gaussian steps."""
    acc = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(DELTA))


def _real_mechanism(n: int) -> tuple[float, int]:
    """The sampling rate and steps per round of DP-SGD over ``n`` rows, worked out here."""
    return min(1.0, BATCH / n), EPOCHS * max(1, round(n / BATCH))


def _clients(cfg: dict) -> dict[int, ClientData]:
    """The clients' real data: the partition, except the deployed client's first 20 rows."""
    exp = assembly.Experiment(config_mod.validate(cfg))
    data = dict(exp.fed.clients)
    d = data[DEPLOYED]
    assert d.num_train > 4 * REAL_ROWS  # the server's copy: far more rows than the client has
    data[DEPLOYED] = ClientData(d.train_x[:REAL_ROWS], d.train_y[:REAL_ROWS])
    return data


def _deployed_transport(
    cfg: dict,
    lie: dict[str, float] | None = None,
    liar: int = 2,
    silent: int | None = None,
    silent_from: int = 1,
):
    """An in-process transport to clients that train on their real data (as deployed clients
    do), each holding the server to the config's pins; ``lie`` overwrites metrics of ``liar``'s
    fit replies; client ``silent`` answers no fit task from round ``silent_from`` on."""
    exp = assembly.Experiment(config_mod.validate(cfg))
    app = ClientApp(exp.model, _clients(cfg), pins=exp.app.pins)

    def handle(cid: int, payload: bytes) -> bytes:
        task = messages.decode(payload)
        if cid == silent and isinstance(task, messages.FitTask) and task.round >= silent_from:
            raise RuntimeError(f"client {cid} left")
        out = app.handle(cid, payload)
        if lie is None or cid != liar:
            return out
        reply = messages.decode(out)
        if isinstance(reply, messages.FitReply):
            reply.metrics.update(lie)
            return messages.encode(reply)
        return out

    return lambda ids: InProcessTransport(handle, ids)


def _expected_epsilons(cfg: dict, rounds: int) -> dict[int, float]:
    """Each client's epsilon after ``rounds`` rounds at its real rate and steps."""
    out = {}
    for cid, d in _clients(cfg).items():
        q, steps = _real_mechanism(d.num_train)
        out[cid] = _dp_sgd_epsilon(q, rounds * steps)
    return out


def test_summary_epsilon_is_that_of_the_client_that_ran_on_its_own_data(tmp_path) -> None:
    cfg = _config()
    summary = fedguard.run(
        cfg, out=tmp_path / "r", progress=False, transport_fn=_deployed_transport(cfg)
    )
    assert summary["status"] == "completed" and summary["clients_rejected"] == 0
    expected = _expected_epsilons(cfg, 3)
    # q = 0.8 over 9 steps: the worst client, above every epsilon the partition's sizes give
    assert max(expected, key=expected.__getitem__) == DEPLOYED
    assert expected[DEPLOYED] == pytest.approx(_dp_sgd_epsilon(0.8, 9))
    assert summary["epsilon"] == pytest.approx(expected[DEPLOYED], rel=1e-9)
    c = summary["privacy"]["clients"][str(DEPLOYED)]
    assert (c["sampling_rate"], c["steps"], c["rounds_reported"]) == (0.8, 9, 3)
    assert c["composed"] == [{"noise_multiplier": Z, "sampling_rate": 0.8, "steps": 9}]
    assert c["planned_sampling_rate"] < 0.2  # the server's copy of the partition
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    per_round = [_dp_sgd_epsilon(0.8, 3 * r) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in rows] == pytest.approx(per_round, rel=1e-9)
    # the checkpoint records the reports, and a resumed run composes the same history
    last = checkpoint.resume_point(tmp_path / "r" / "checkpoints", max_round=3)
    assert last is not None
    assert last.info["dp_sgd_reports"][str(DEPLOYED)] == [[r, 0.8, 3, Z] for r in (1, 2, 3)]
    part = tmp_path / "part"
    short = _config(experiment={"name": "tiny", "seed": 3, "rounds": 2})
    fedguard.run(short, out=part, progress=False, transport_fn=_deployed_transport(cfg))
    resumed = fedguard.run(
        cfg, out=part, resume=True, progress=False, transport_fn=_deployed_transport(cfg)
    )
    assert resumed["epsilon"] == pytest.approx(expected[DEPLOYED], rel=1e-9)
    assert resumed["privacy"]["clients"] == summary["privacy"]["clients"]


def test_a_round_without_a_reply_counts_at_the_last_report(tmp_path) -> None:
    # the deployed client trains in round 3 but its reply never arrives: it is accounted at what
    # it reported in rounds 1-2 (q = 0.8, 3 steps), not at the server's copy of its partition
    cfg = _config()
    transport = _deployed_transport(cfg, silent=DEPLOYED, silent_from=3)
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False, transport_fn=transport)
    assert summary["clients_failed"] == 1
    assert summary["epsilon"] == pytest.approx(_dp_sgd_epsilon(0.8, 9), rel=1e-9)
    c = summary["privacy"]["clients"][str(DEPLOYED)]
    assert (c["rounds_joined"], c["rounds_reported"], c["steps"]) == (3, 2, 9)


def test_budget_check_uses_the_reported_history(tmp_path) -> None:
    # between what the deployed client ran after 2 and after 3 rounds, and above the epsilon
    # of 3 rounds at the rates and steps of the server's partition sizes
    after = [_dp_sgd_epsilon(0.8, 3 * r) for r in (2, 3)]
    limit = 0.5 * (after[0] + after[1])
    cfg = _config(privacy={**LOCAL, "max_epsilon": limit})
    planned = assembly.Experiment(config_mod.validate(cfg)).privacy
    assert planned is not None and planned.epsilon_of([Z] * 3) < limit
    summary = fedguard.run(
        cfg, out=tmp_path / "r", progress=False, transport_fn=_deployed_transport(cfg)
    )
    assert summary["status"] == "budget_spent" and summary["rounds_completed"] == 2
    assert summary["epsilon"] == pytest.approx(after[0], rel=1e-9)
    assert "round 3 would bring epsilon" in (tmp_path / "r" / "run.log").read_text()


def _final_params(folder) -> torch.Tensor:
    last = checkpoint.resume_point(folder / "checkpoints", max_round=3)
    assert last is not None
    return last.tensors["params"]


def test_a_reply_that_ran_less_noise_than_the_plan_is_rejected(tmp_path, caplog) -> None:
    cfg = _config()
    caplog.set_level(logging.WARNING, logger="fedguard")
    liar = _deployed_transport(cfg, lie={messages.DP_SGD_RAN_NOISE: 0.5 * Z})
    summary = fedguard.run(cfg, out=tmp_path / "lie", progress=False, transport_fn=liar)
    assert summary["clients_rejected"] == 3  # client 2, every round
    assert "client 2 rejected: DP-SGD ran at noise multiplier 0.55" in caplog.text
    # its update is not used: the model is the one of a run in which client 2 never replies
    silent = _deployed_transport(cfg, silent=2)
    fedguard.run(cfg, out=tmp_path / "gone", progress=False, transport_fn=silent)
    assert torch.equal(_final_params(tmp_path / "lie"), _final_params(tmp_path / "gone"))
    # the refused client is accounted at the plan's mechanism for it: the worst is unchanged
    assert summary["epsilon"] == pytest.approx(_expected_epsilons(cfg, 3)[DEPLOYED], rel=1e-9)


def test_simulation_rejects_a_reply_whose_steps_differ_from_the_plan(tmp_path, monkeypatch) -> None:
    real_fit = ClientApp.fit

    def fewer_steps(self, task):  # noqa: ANN001, ANN202
        reply = real_fit(self, task)
        if task.client_id == 4:
            reply.metrics[messages.DP_SGD_RAN_STEPS] -= 1
        return reply

    monkeypatch.setattr(ClientApp, "fit", fewer_steps)
    summary = fedguard.run(_config(), out=tmp_path / "r", progress=False)
    assert summary["clients_rejected"] == 3
    assert "client 4 rejected: DP-SGD ran" in (tmp_path / "r" / "run.log").read_text()
