"""DP runs end to end: epsilon per round equals dp-accounting's, budgets stop, bad settings fail."""

from __future__ import annotations

import json

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from safetensors.torch import load_file

import fedguard
from conftest import tiny_config
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.experiment.config import ConfigError
from fedguard.protocol import driver, fedopt, messages
from fedguard.protocol.strategy import CentralDP, StrategyKind
from fedguard.simulation.inprocess import InProcessTransport

CENTRAL = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3}


def _rows(folder) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def _fixed_size_epsilon(z: float, n: int, m: int, rounds: int, delta: float) -> float:
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # noise std z * C over the replace-one sensitivity 2C of the clipped sum: multiplier z / 2
    gaussian = dp_accounting.GaussianDpEvent(z / 2)
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, gaussian)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.mark.plots  # its pictures are drawn (conftest)
def test_central_dp_epsilon_per_round_matches_dp_accounting(tmp_path) -> None:
    summary = fedguard.run(tiny_config(privacy=CENTRAL), out=tmp_path / "r", progress=False)
    rows = _rows(tmp_path / "r")
    expected = [_fixed_size_epsilon(1.0, 6, 4, r, 1e-3) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in rows] == pytest.approx(expected)
    assert expected[0] < expected[1] < expected[2]
    assert summary["epsilon"] == pytest.approx(expected[2]) and summary["delta"] == 1e-3
    p = summary["privacy"]
    assert (p["population"], p["sample_size"], p["rounds"]) == (6, 4, 3)
    assert p["noise_multiplier"] == 1.0 and p["neighboring_relation"] == "replace_one"
    assert (tmp_path / "r" / "plots" / "privacy.png").stat().st_size > 0


def test_poisson_client_sampling_and_pld(tmp_path, monkeypatch) -> None:
    """The cohorts that receive fit tasks are the Poisson draws at the rate the accountant
    composes (q = 3 / 6), their sizes vary, and each round reports the cohort that trained."""
    cohorts: dict[int, list[int]] = {}
    real_exchange = InProcessTransport.exchange

    def recording_exchange(self, requests, *, deadline_s):  # noqa: ANN001, ANN202
        for cid in requests:
            task = messages.decode(requests[cid])
            if isinstance(task, messages.FitTask):
                cohorts.setdefault(task.round, []).append(cid)
        return real_exchange(self, requests, deadline_s=deadline_s)

    monkeypatch.setattr(InProcessTransport, "exchange", recording_exchange)
    cfg = tiny_config(
        server={"sampling": "poisson", "clients_per_round": 3},
        privacy={**CENTRAL, "accountant": "pld"},
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    rows = _rows(tmp_path / "r")
    q = summary["privacy"]["sampling_rate"]
    assert sorted(cohorts) == [1, 2, 3]
    for r, row in zip((1, 2, 3), rows, strict=True):
        assert sorted(cohorts[r]) == driver.poisson_sample(range(6), q, seed=3, round_=r)
        assert row["clients_sampled"] == len(cohorts[r])
    # Poisson cohorts, not a fixed 3 of 6: with seed 3 the sizes are not all the expected size.
    assert {len(c) for c in cohorts.values()} != {3}
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, 3))
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(1e-3))
    assert summary["privacy"]["sampling_rate"] == 0.5


def test_target_epsilon_is_calibrated_before_round_1(tmp_path) -> None:
    privacy = {**CENTRAL, "noise_multiplier": None, "target_epsilon": 4.0}
    privacy.pop("noise_multiplier")
    summary = fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "r", progress=False)
    assert 3.9 <= summary["epsilon"] <= 4.0
    z = summary["privacy"]["noise_multiplier"]
    assert summary["privacy"]["noise_calibrated_to_target"]
    assert _fixed_size_epsilon(z, 6, 4, 3, 1e-3) == pytest.approx(summary["epsilon"])


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path) -> None:
    limit = 0.5 * (
        _fixed_size_epsilon(1.0, 6, 4, 2, 1e-3) + _fixed_size_epsilon(1.0, 6, 4, 3, 1e-3)
    )
    cfg = tiny_config(experiment={"rounds": 5}, privacy={**CENTRAL, "max_epsilon": limit})
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    assert summary["status"] == "budget_spent"
    assert summary["rounds_completed"] == 2
    assert summary["epsilon"] <= limit
    log = (tmp_path / "r" / "run.log").read_text()
    assert "round 3 would bring epsilon" in log


def test_adaptive_clipping_moves_the_clip_and_resume_repeats_the_noise(tmp_path) -> None:
    privacy = {**CENTRAL, "adaptive_clip": True, "clip_norm": 1e-4, "clip_count_stddev": 1.0}
    full = tiny_config(experiment={"rounds": 4}, privacy=privacy)
    fedguard.run(full, out=tmp_path / "full", progress=False)
    last = sorted((tmp_path / "full" / "checkpoints").glob("round_*"))[-1]
    clip = float(load_file(str(last / "tensors.safetensors"))[f"server.{messages.DP_CLIP_NORM}"][0])
    assert clip > 1.2e-4  # every update is longer than 1e-4: the clip grows
    part = tiny_config(experiment={"rounds": 2}, privacy=privacy)
    fedguard.run(part, out=tmp_path / "part", progress=False)
    fedguard.run(full, out=tmp_path / "part", resume=True, progress=False)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part")


def test_server_reclips_an_update_from_a_lying_client() -> None:
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1e-12, expected_clients=2.0, seed=0)
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=2, central_dp=dp)
    params = torch.zeros(3)
    state = strategy.init(params)
    honest = dp_fedavg.clip_update(torch.tensor([0.0, 3.0, 4.0]), 1.0).update
    liar = torch.tensor([300.0, 0.0, 400.0])  # claims to have clipped, did not
    replies = [
        messages.FitReply(1, i, u, 10, {"train_loss": 0.0}) for i, u in enumerate([honest, liar])
    ]
    _, new = strategy.aggregate(state, params, replies, round_=1)
    torch.testing.assert_close(new, torch.tensor([0.3, 0.3, 0.8]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"mode": "central", "noise_multiplier": 1.0, "delta": 0.2}, "privacy.delta=0.2 must be"),
        ({"mode": "central", "noise_multiplier": 0.0}, "privacy.noise_multiplier"),
        ({"mode": "central"}, "exactly one of privacy.noise_multiplier"),
        ({"mode": "central", "target_epsilon": 1e-4, "delta": 1e-3}, "cannot be reached"),
        ({"mode": "central", "noise_multiplier": 1.0, "accountant": "pld"}, "fixed-size"),
        (
            {
                "mode": "central",
                "noise_multiplier": 1.0,
                "adaptive_clip": True,
                "clip_count_stddev": 0.1,
            },
            "clip_count_stddev",
        ),
    ],
)
def test_misconfiguration_fails_before_round_1(tmp_path, privacy, message) -> None:
    with pytest.raises(ConfigError, match=message):
        fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


LOCAL = {"mode": "local", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-3}


def test_local_dp_sgd_reports_the_worst_clients_epsilon(tmp_path) -> None:
    summary = fedguard.run(tiny_config(privacy=LOCAL), out=tmp_path / "r", progress=False)
    clients = summary["privacy"]["clients"]
    assert summary["privacy"]["mechanism"] == "dp_sgd_poisson_gaussian"

    def direct(q: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        acc = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return acc.get_epsilon(1e-3)

    per_client = [direct(c["sampling_rate"], c["steps"]) for c in clients.values()]
    assert summary["epsilon"] == pytest.approx(max(per_client))
    assert sum(c["rounds_joined"] for c in clients.values()) == 3 * 4  # 4 sampled per round
    for c in clients.values():
        assert c["steps"] == c["rounds_joined"] * round(1 / c["sampling_rate"])
    rows = _rows(tmp_path / "r")
    assert rows[0]["epsilon"] < rows[-1]["epsilon"] == pytest.approx(summary["epsilon"])
    assert all(0.0 < r["train_loss"] < 5.0 for r in rows)


def test_local_dp_refuses_keras_and_batch_norm_before_round_1(tmp_path) -> None:
    keras_cfg = tiny_config(model={"framework": "keras"}, privacy=LOCAL)
    with pytest.raises(ConfigError, match="PyTorch"):
        fedguard.run(keras_cfg, out=tmp_path / "k", progress=False)

    def with_batch_norm(input_shape, num_classes):
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 4 * 4, num_classes),
        )

    with pytest.raises(ConfigError, match="GroupNorm"):
        fedguard.run(
            tiny_config(privacy=LOCAL), out=tmp_path / "b", progress=False, model_fn=with_batch_norm
        )
