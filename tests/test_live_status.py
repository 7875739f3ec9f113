"""A run's status.json during a round: each reply shows as it arrives, before the round ends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import tiny_config
from fedguard.client.app import ClientApp
from fedguard.experiment import config as config_mod
from fedguard.experiment import runner
from fedguard.experiment.assembly import Experiment
from fedguard.observe import status
from fedguard.protocol import messages
from fedguard.simulation.inprocess import InProcessTransport


def test_each_reply_is_in_status_json_before_the_next_client_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no rate limit, so every arrival is written (the limit is the status writer's own test)
    monkeypatch.setattr(status, "MIN_INTERVAL_S", 0.0)
    cfg = config_mod.validate(tiny_config(experiment={"rounds": 2, "name": "live"}))
    exp = Experiment(cfg)
    app = ClientApp(exp.model, exp.fed.clients, pins=exp.app.pins)
    out = tmp_path / "run"
    seen: list[tuple[int, int, list[tuple[int, str]]]] = []  # (round, client, table then)
    failing = exp.driver.sample(2)[1]

    def handler(cid: int, payload: bytes) -> bytes:
        message = messages.decode(payload)
        if isinstance(message, messages.FitTask):
            current = json.loads((out / status.FILE).read_text())["current"]
            table = [(c["client"], c["status"]) for c in current["clients"]]
            seen.append((message.round, cid, table))
            if message.round == 2 and cid == failing:
                raise ConnectionError("unplugged")
        return app.handle(cid, payload)

    def transport(ids: Sequence[int]) -> InProcessTransport:
        return InProcessTransport(handler, ids)

    runner.run(cfg, out=out, progress=False, transport_fn=transport)
    for round_ in (1, 2):
        sampled = exp.driver.sample(round_)
        tables = [table for r, _, table in seen if r == round_]
        assert [cid for r, cid, _ in seen if r == round_] == sampled
        for k, table in enumerate(tables):  # when client k trains, 0..k-1 have answered
            answered = [
                "failed" if (round_ == 2 and c == failing) else "replied" for c in sampled[:k]
            ]
            assert table == list(zip(sampled, answered + ["sampled"] * (4 - k), strict=True))
    final = json.loads((out / status.FILE).read_text())["current"]
    reasons = {c["client"]: c["reason"] for c in final["clients"]}
    assert reasons[failing] == "error: ConnectionError: unplugged"
