"""The dashboard in a real browser (headless Chromium) while a short run goes on.

The run's rounds are released one at a time by the test (its transport waits on a semaphore),
so the page is checked at known points of the run without any timing: after round 1, while
round 2 is in progress (its sampled clients listed as such), and at the end, where the charts
hold exactly the rounds of metrics.jsonl and the client table shows the failed and the rejected
client of the last round. The same browser then opens a finished run whose boosting client Krum
left out, and finds it so marked in the client table.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from browser import browser, full_page_screenshot, wait_for  # noqa: F401 (fixture)
from conftest import metric_rows, ten_iid_config, tiny_config
from fedguard.client.app import ClientApp
from fedguard.experiment import config as config_mod
from fedguard.experiment import runner
from fedguard.experiment.assembly import Experiment
from fedguard.observe import serve
from fedguard.protocol.transport import Outcome
from fedguard.runtime.grpc_launch import free_port
from fedguard.simulation.inprocess import InProcessTransport

ROUNDS = 3


class GatedTransport(InProcessTransport):
    """The in-process transport, each exchange waiting for the test to release it."""

    def __init__(self, handler, ids: Sequence[int], gate: threading.Semaphore) -> None:
        super().__init__(handler, ids)
        self.gate = gate

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        if not self.gate.acquire(timeout=120):
            raise RuntimeError("the test never released this round")
        return super().exchange(requests, deadline_s=deadline_s)


# The page redraws on every poll: read what it shows in one script call (no stale elements).
def _counter(driver) -> str | None:
    return driver.execute_script(
        "const e = document.getElementById('round-0'); return e && e.textContent;"
    )


def _clients_table(driver) -> tuple[str, list[list[str]]]:
    """The first run's client table: its heading and its rows' cells."""
    return tuple(
        driver.execute_script(
            "const t = document.getElementById('clients-0'); if (!t) return ['', []];"
            "return [t.querySelector('h3').textContent, [...t.querySelectorAll('.client-row')]"
            ".map(r => [...r.cells].map(c => c.textContent))];"
        )
    )


def test_dashboard_follows_a_live_run_in_chromium(tmp_path: Path, browser) -> None:  # noqa: F811
    cfg = config_mod.validate(tiny_config(experiment={"rounds": ROUNDS, "name": "live"}))
    exp = Experiment(cfg)
    last_sampled = exp.driver.sample(ROUNDS)
    failing, junk = last_sampled[0], last_sampled[1]  # in the last round: one fails, one is junk
    app = ClientApp(exp.model, exp.fed.clients, pins=exp.app.pins)

    def handler(cid: int, payload: bytes) -> bytes:
        if _round_of(payload) == ROUNDS:
            if cid == failing:
                raise ConnectionError("client unplugged")
            if cid == junk:
                return b"not a reply"
        return app.handle(cid, payload)

    gate = threading.Semaphore(0)
    out = tmp_path / "run"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(
                cfg,
                out=out,
                progress=False,
                transport_fn=lambda ids: GatedTransport(handler, ids, gate),
            )
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    port = free_port()
    dashboard = serve.Background([out], serve.DashboardOptions(f"127.0.0.1:{port}", poll_ms=200))
    dashboard.start()
    thread = threading.Thread(target=run)
    try:
        thread.start()
        browser.get(f"http://127.0.0.1:{port}/")
        gate.release()  # round 1
        wait_for(browser, lambda d: _counter(d) == "1", "round 1 finished")
        # round 2 is waiting at the gate: its sampled clients are listed, none replied yet
        sampled2 = exp.driver.sample(2)
        _, rows = wait_for(
            browser,
            lambda d: "round 2 (training)" in _clients_table(d)[0] and _clients_table(d),
            "round 2 in progress",
        )
        assert [(int(r[0]), r[1]) for r in rows] == [(c, "sampled") for c in sampled2]
        for _ in range(ROUNDS - 1):
            gate.release()
        wait_for(browser, lambda d: _counter(d) == str(ROUNDS), f"round {ROUNDS}")
        wait_for(
            browser,
            lambda d: "completed" in d.execute_script("return document.body.textContent"),
            "the run completed",
        )
        thread.join(timeout=120)
        assert not errors, errors
        metrics = metric_rows(out)
        chart = browser.execute_script(
            "const d = document.getElementById('chart-accuracy').data[0]; return [d.x, d.y];"
        )
        assert chart[0] == list(range(1, ROUNDS + 1))
        assert chart[1] == [r["test_accuracy"] for r in metrics]
        loss = browser.execute_script("return document.getElementById('chart-loss').data[1].y")
        assert loss == [r["train_loss"] for r in metrics]
        heading, rows = _clients_table(browser)
        assert heading.endswith(f"round {ROUNDS} (done)")
        outcome = {int(r[0]): r[1] for r in rows}
        reasons = {int(r[0]): r[3] for r in rows}
        assert outcome[failing] == "failed" and outcome[junk] == "rejected"
        assert [c for c, s in outcome.items() if s == "replied"] == last_sampled[2:]
        assert "client unplugged" in reasons[failing]
        assert "Malformed" in reasons[junk]
        assert metrics[-1]["clients_failed"] == 1 and metrics[-1]["clients_rejected"] == 1
        shot = full_page_screenshot(browser, tmp_path / "dashboard.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _krum_page_shows_the_outlier_left_out(browser, tmp_path)
    finally:
        for _ in range(ROUNDS):
            gate.release()
        thread.join(timeout=120)
        dashboard.stop()


def _krum_page_shows_the_outlier_left_out(browser, tmp_path: Path) -> None:  # noqa: F811
    """The same browser on a run whose one boosting client Krum leaves out: the client table
    says so for that client (and for every other client but the one Krum returned)."""
    cfg = config_mod.validate(
        ten_iid_config(
            "krum",
            experiment={"rounds": 2},
            server={"aggregator": "krum", "byzantine_f": 1},
            attack={"kind": "boost", "fraction": 0.1, "factor": 50.0},
        )
    )
    summary = runner.run(cfg, out=tmp_path / "krum", progress=False)
    (outlier,) = summary["attack"]["malicious"]
    status = json.loads((tmp_path / "krum" / "status.json").read_text())
    verdicts = {c["client"]: c["left_out_by"] for c in status["current"]["clients"]}
    kept = [c for c, v in verdicts.items() if v is None]
    assert len(kept) == 1 and kept[0] != outlier and verdicts[outlier] == "krum"
    assert metric_rows(tmp_path / "krum")[-1]["left_out_clients"] == sorted(
        c for c in verdicts if c != kept[0]
    )
    port = free_port()
    page = serve.Background(
        [tmp_path / "krum"], serve.DashboardOptions(f"127.0.0.1:{port}", poll_ms=200)
    )
    page.start()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        heading, rows = wait_for(
            browser,
            lambda d: "round 2 (done)" in _clients_table(d)[0] and _clients_table(d),
            "the Krum run's client table",
        )
        assert "rule krum, 9 left out" in heading
        shown = {int(r[0]): r[4] for r in rows}
        assert shown[outlier] == "left out by krum" and shown[kept[0]] == ""
        assert sum(v == "left out by krum" for v in shown.values()) == 9
        total = browser.execute_script(
            "return document.querySelector('.left-out-total').textContent"
        )
        assert total == "18"  # 9 in each of the 2 rounds
    finally:
        page.stop()


def _round_of(payload: bytes) -> int:
    from fedguard.protocol import messages

    return int(messages.decode(payload).round)
