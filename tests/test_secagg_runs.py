"""Secure aggregation through the experiment runner: same model as plain FedAvg, DP, aborts."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

import fedguard
from conftest import driven_params, tiny_config
from fedguard.experiment import config, engines
from fedguard.experiment.assembly import Experiment
from fedguard.protocol import messages, secagg
from fedguard.protocol.secagg import Phase
from fedguard.simulation.dropout import PhaseDropout

CLIP = 0.05


@pytest.mark.parametrize(
    ("mode", "strategy"), [("secagg", "fedavg"), ("secagg+", "fedadam"), ("secagg", "fedavgm")]
)
def test_secure_run_equals_plain_run_with_the_same_client_clip(mode: str, strategy: str) -> None:
    server = {"strategy": strategy, "clients_per_round": 5}
    data = {"num_clients": 8}
    secure = Experiment(
        config.validate(
            tiny_config(
                server=server,
                data=data,
                secure_aggregation={"enabled": True, "mode": mode, "clip_norm": CLIP, "bits": 64},
            )
        )
    )
    plain = Experiment(config.validate(tiny_config(server=server, data=data)))
    clipped = replace(
        plain.strategy, client_config={**plain.strategy.client_config, messages.DP_CLIP_NORM: CLIP}
    )
    unclipped_params = driven_params(plain, 2)
    plain.driver.strategy = clipped
    expected = driven_params(plain, 2)
    got = driven_params(secure, 2)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected, unclipped_params, rtol=1e-3)  # the clip did bind


def test_32_bit_ring_is_close_to_plain() -> None:
    sa = {"enabled": True, "mode": "secagg+", "clip_norm": 100.0}
    secure = Experiment(config.validate(tiny_config(secure_aggregation=sa)))
    plain = Experiment(config.validate(tiny_config()))
    delta = driven_params(plain, 1) - plain.initial_params
    error = (driven_params(secure, 1) - secure.initial_params - delta).abs().max()
    scale = secure.driver.secure_aggregation.fixed_point(4).scale
    assert error <= 4 / scale  # one quantisation step per client at most
    assert error < 1e-3 * delta.abs().max()


def test_central_dp_under_secure_aggregation_matches_central_dp(tmp_path) -> None:
    privacy = {"mode": "central", "noise_multiplier": 0.8, "clip_norm": 0.05}
    sa = {"enabled": True, "bits": 64}
    secure = fedguard.run(
        tiny_config(privacy=privacy, secure_aggregation=sa), out=tmp_path / "s", progress=False
    )
    plain = fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "p", progress=False)
    assert secure["status"] == "completed" and secure["rounds_completed"] == 3
    assert secure["epsilon"] == pytest.approx(plain["epsilon"]) and secure["epsilon"] > 0
    assert secure["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
    rows = [
        json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
    ]
    plain_rows = [
        json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["bytes_up"] > p["bytes_up"] for r, p in zip(rows, plain_rows, strict=True))


def test_aborted_round_leaves_the_model_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    real = engines.InProcessTransport

    class RoundTwoDropout(PhaseDropout):
        def exchange(self, requests, *, deadline_s):
            first = messages.decode(next(iter(requests.values())))
            self.drops = {Phase.MASK: {0, 1, 2, 3, 4, 5}} if first.round == 2 else {}
            return super().exchange(requests, deadline_s=deadline_s)

    monkeypatch.setattr(
        engines, "InProcessTransport", lambda *a, **k: RoundTwoDropout(real(*a, **k), {})
    )
    sa = {"enabled": True, "clip_norm": 1.0}
    summary = fedguard.run(tiny_config(secure_aggregation=sa), out=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2, 3]
    assert "nothing was unmasked" in rows[1]["secure_aggregation_aborted"]
    assert rows[1]["clients_completed"] == 0 and rows[1]["bytes_up"] > 0
    assert rows[0]["test_loss"] is not None and rows[2]["test_loss"] is not None


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"server": {"strategy": "scaffold"}}, "SCAFFOLD's control deltas have no norm bound"),
        ({"client": {"optimizer": "newton"}}, "the Newton step needs per-client gradient"),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0, "adaptive_clip": True}},
            "privacy.adaptive_clip needs each client's clipped bit",
        ),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 2.0}},
            "differs from privacy.clip_norm=2.0",
        ),
        ({"server": {"clients_per_round": 1}}, "needs at least 2 clients per round, got 1"),
    ],
)
def test_incompatible_settings_fail_before_round_one(sections: dict, message: str) -> None:
    cfg = tiny_config(secure_aggregation={"enabled": True, "clip_norm": 1.0}, **sections)
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_ring_too_small_for_the_cohort_is_refused() -> None:
    cfg = config.validate(
        tiny_config(secure_aggregation={"enabled": True, "clip_norm": 1.0, "bits": 8})
    )
    with pytest.raises(config.ConfigError, match="8 bits cannot hold the sum of 4 updates"):
        Experiment(cfg)


def test_settings_refuse_neighbours_in_complete_mode() -> None:
    with pytest.raises(ValueError, match=re.escape('only chosen in mode "secagg+"')):
        secagg.Settings(secagg.Mode.SECAGG, clip_norm=1.0, max_weight=1, neighbours=3)
