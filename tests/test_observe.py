"""The pieces the dashboard and the report stand on: the status file, reading run folders in
any state, viewer tokens and the refusals of `fedguard dashboard`. No run, no browser."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedguard import cli
from fedguard.observe import access, runview, serve, status
from fedguard.runtime.grpc_launch import free_port


def test_client_statuses_name_each_outcome_with_its_reason_and_latency() -> None:
    got = status.client_statuses(
        [4, 1, 7, 2],
        [(1, "timeout: replied after 9.00 s"), (7, "rejected: Update norm 1e+30 is absurd")],
        {4: 0.123456, 7: 0.5},
    )
    none = {"left_out_by": None, "trimmed_share": None}  # no robust rule said anything
    assert got == [
        {"client": 4, "status": "replied", "reason": None, "seconds": 0.1235, **none},
        {
            "client": 1,
            "status": "failed",
            "reason": "timeout: replied after 9.00 s",
            "seconds": None,
            **none,
        },
        {
            "client": 7,
            "status": "rejected",
            "reason": "Update norm 1e+30 is absurd",
            "seconds": 0.5,
            **none,
        },
        {"client": 2, "status": "replied", "reason": None, "seconds": None, **none},
    ]


def test_status_writer_tracks_rounds_time_left_and_budget(tmp_path: Path) -> None:
    now = [1000.0]
    writer = status.StatusWriter(
        tmp_path,
        name="s",
        rounds_planned=5,
        max_epsilon=8.0,
        delta=1e-5,
        mode="sync",
        clock=lambda: now[0],
    )
    writer.round_started(1, [3, 0])
    read = json.loads((tmp_path / status.FILE).read_text())
    assert read["state"] == "running" and read["current"]["phase"] == "training"
    assert [c["status"] for c in read["current"]["clients"]] == ["sampled", "sampled"]
    for r, seconds in ((1, 2.0), (2, 4.0)):
        row = {
            "round": r,
            "epsilon": 1.5 * r,
            "clients_sampled": 2,
            "bytes_up": 10 * r,
            "test_loss": float("nan"),
        }
        writer.round_finished(r, row, [], seconds)
    read = json.loads((tmp_path / status.FILE).read_text())
    assert read["rounds_done"] == 2 and read["seconds_per_round"] == 3.0
    assert read["seconds_left"] == 9.0  # 3 rounds left at 3 s
    assert read["privacy"] == {"max_epsilon": 8.0, "delta": 1e-5, "epsilon": 3.0}
    assert read["last"]["bytes_up"] == 20
    writer.round_started(3, [1])
    writer.finished("budget_spent", None, 3.0)
    read = json.loads((tmp_path / status.FILE).read_text())
    assert read["state"] == "budget_spent" and read["current"]["round"] == 2  # 3 never ran
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_json_safe_makes_what_a_browser_refuses_plain() -> None:
    import torch

    got = status.json_safe({"a": float("inf"), "b": [float("nan"), 1], 3: torch.tensor(2.5)})
    assert got == {"a": None, "b": [None, 1], "3": 2.5}


def test_metrics_being_written_and_malformed_lines(tmp_path: Path) -> None:
    text = '{"round": 1, "x": 1}\nnot json\n[1, 2]\n{"round": 2, "x": NaN}\n{"round": 3, "x"'
    rows, problems = runview.parse_metrics(text)
    assert rows == [{"round": 1, "x": 1}, {"round": 2, "x": None}]  # NaN shown as null
    assert problems == [
        "metrics.jsonl line 2 is not JSON; skipped",
        "metrics.jsonl line 3 has no integer round; skipped",
    ]  # the cut last line is a row being written, not a problem


def test_reader_shows_what_it_can_of_a_broken_folder(tmp_path: Path) -> None:
    reader = runview.RunReader()
    missing = reader.read(tmp_path / "later")
    assert missing["is_run"] is False and "no such folder" in missing["problems"][0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1, "test_accuracy": 0.5}\n')
    (run / "summary.json").write_text("{ half")
    (run / "config.toml").write_text("[experiment]\nname = 'named'\n")
    got = reader.read(run)
    assert got["is_run"] and got["metrics"] == [{"round": 1, "test_accuracy": 0.5}]
    assert got["summary"] is None and any(
        "summary.json cannot be read" in p for p in got["problems"]
    )
    assert got["config"] == {"experiment": {"name": "named"}}
    (run / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    assert [r["round"] for r in reader.read(run)["metrics"]] == [1, 2]  # re-read on change
    with pytest.raises(runview.NotARunError, match="not a run folder"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x.txt").write_text("x")
        runview.check_run_dir(tmp_path / "other")


def test_viewer_tokens_open_the_dashboard_and_nothing_else(tmp_path: Path) -> None:
    token = access.make_viewer(tmp_path, "ops").read_text().strip()
    assert (tmp_path / "viewer-ops.token").stat().st_mode & 0o077 == 0
    check = access.ViewerCheck(tmp_path / access.VIEWERS_FILE)
    assert check.accepts(token) and not check.accepts(token + "x") and not check.accepts(None)
    assert not (tmp_path / "tokens.json").exists()  # never a client credential
    port = free_port()
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    options = serve.DashboardOptions(f"127.0.0.1:{port}", viewers=tmp_path / access.VIEWERS_FILE)
    dashboard = serve.Background([run], options)
    dashboard.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert _status(f"{base}/api/runs") == 401
        assert _status(f"{base}/static/plotly.min.js") == 401
        assert _status(f"{base}/api/runs", token) == 200
        assert _status(f"{base}/?token={token}") == 200
        access.revoke_viewer(tmp_path / access.VIEWERS_FILE, "ops")
        assert _status(f"{base}/api/runs", token) == 401  # revoked without a restart
    finally:
        dashboard.stop()


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert access.is_loopback(address) is loopback


def test_dashboard_command_refusals_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("a")
    assert cli.main(["dashboard", str(tmp_path / "notes")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert cli.main(["dashboard", str(run), "--address", "0.0.0.0:8050"]) == 2
    assert "--viewer-tokens" in capsys.readouterr().err
    assert cli.main(["dashboard", str(run), "--address", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert cli.main(["tokens", str(tmp_path / "t"), "--viewer", "a b"]) == 2
    assert "--viewer 'a b'" in capsys.readouterr().err
    (tmp_path / "c.pem").write_text("a certificate")
    assert cli.main(["dashboard", str(run), "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "certificate and key go together" in capsys.readouterr().err


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    first = serve.Background([tmp_path], serve.DashboardOptions(f"127.0.0.1:{port}"))
    first.start()
    try:
        with pytest.raises(serve.DashboardConfigError, match="could not listen"):
            serve.Background([tmp_path], serve.DashboardOptions(f"127.0.0.1:{port}")).start()
    finally:
        first.stop()


def _shown(folder: Path) -> dict[int, tuple]:
    """The current round's clients as the status file shows them."""
    current = json.loads((folder / status.FILE).read_text())["current"]
    return {c["client"]: (c["status"], c["reason"], c["seconds"]) for c in current["clients"]}


def test_replies_reach_the_status_file_as_they_arrive_at_most_every_half_second(
    tmp_path: Path,
) -> None:
    now = [100.0]
    timers: list[list] = []  # [delay, action, cancelled]: the writer's scripted timers

    def schedule(delay: float, action):
        timers.append([round(delay, 9), action, False])
        entry = timers[-1]
        return lambda: entry.__setitem__(2, True)

    writer = status.StatusWriter(
        tmp_path,
        name="live",
        rounds_planned=2,
        max_epsilon=None,
        delta=None,
        mode="sync",
        clock=lambda: now[0],
        schedule=schedule,
    )
    writer.round_started(1, [4, 2, 9, 7])
    assert writer.writes == 1
    now[0] = 100.2  # 0.2 s after the last write: held back, a timer for the 0.3 s left
    writer.client_arrived(1, 2, seconds=0.2)
    assert writer.writes == 1 and writer.pending
    assert _shown(tmp_path)[2] == ("sampled", None, None)
    assert writer.status["current"]["clients"][1]["status"] == "replied"
    now[0] = 100.3
    writer.client_arrived(1, 9, failed="timeout: no reply within 0.5 s")  # held back too
    assert writer.writes == 1 and [t[0] for t in timers] == [0.3]  # one timer at a time
    now[0] = 100.5  # the timer fires: both arrivals are written
    timers[0][1]()
    assert writer.writes == 2 and not writer.pending
    assert _shown(tmp_path) == {
        4: ("sampled", None, None),
        2: ("replied", None, 0.2),
        9: ("failed", "timeout: no reply within 0.5 s", None),
        7: ("sampled", None, None),
    }
    now[0] = 101.2  # 0.7 s after that write: this arrival writes at once, no timer
    writer.client_arrived(1, 4, seconds=0.6543217)
    assert writer.writes == 3 and len(timers) == 1
    assert _shown(tmp_path)[4] == ("replied", None, 0.6543)
    now[0] = 101.3
    writer.client_arrived(1, 7, seconds=1.3)  # held back: a second timer, for 0.4 s
    writer.client_arrived(2, 7, seconds=1.0)  # another round's: ignored
    writer.client_arrived(1, 99, seconds=1.0)  # not sampled: ignored
    assert writer.writes == 3 and [t[0] for t in timers] == [0.3, 0.4]
    assert _shown(tmp_path)[7] == ("sampled", None, None)
    now[0] = 101.4  # the round's end writes at once and cancels the timer
    clients = status.client_statuses(
        [4, 2, 9, 7],
        [(9, "timeout: no reply within 0.5 s")],
        {4: 0.6543217, 2: 0.2, 7: 1.3},
        rule="krum",
        left_out=[2, 4],
    )
    row = {"round": 1, "robust_rule": "krum", "clients_left_out": 2}
    writer.round_finished(1, row, clients, 1.4)
    assert writer.writes == 4 and not writer.pending and timers[1][2] is True
    timers[1][1]()  # a timer that fires anyway (cancelled too late) writes nothing
    assert writer.writes == 4
    read = json.loads((tmp_path / status.FILE).read_text())
    assert read["current"]["robust_rule"] == "krum" and read["current"]["clients_left_out"] == 2
    assert [(c["client"], c["status"], c["left_out_by"]) for c in read["current"]["clients"]] == [
        (4, "replied", "krum"),
        (2, "replied", "krum"),
        (9, "failed", None),
        (7, "replied", None),
    ]
    now[0] = 105.0
    writer.client_arrived(1, 7, seconds=2.0)  # after the round's end: nothing to change
    assert writer.writes == 4 and len(timers) == 2


def test_a_held_back_reply_is_written_by_a_real_timer(tmp_path: Path) -> None:
    writer = status.StatusWriter(
        tmp_path, name="t", rounds_planned=1, max_epsilon=None, delta=None, mode="sync"
    )
    writer.round_started(1, [0, 1])
    writer.client_arrived(1, 0, seconds=0.01)  # within 0.5 s of the round's start: held back
    assert _shown(tmp_path)[0] == ("sampled", None, None)
    deadline = time.monotonic() + 30  # a wait for the timer, not an assertion on time
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _shown(tmp_path) == {0: ("replied", None, 0.01), 1: ("sampled", None, None)}


def test_task_statuses_give_each_reply_of_a_buffer_its_own_verdict() -> None:
    tasks = [
        {"client": 3, "status": "replied", "seconds": 0.25, "staleness": 1},
        {"client": 3, "status": "replied", "seconds": 1.5, "staleness": 0},
        {"client": 5, "status": "stale", "reason": "stale: trained on version 0", "seconds": 2},
        {"client": 1, "status": "training"},
    ]
    got = status.task_statuses(tasks, rule="krum", verdicts=[(True, None), (False, None)])
    assert [(e["client"], e["status"], e["left_out_by"], e["staleness"]) for e in got] == [
        (3, "replied", "krum", 1),
        (3, "replied", None, 0),
        (5, "stale", None, None),
        (1, "training", None, None),
    ]
    assert got[2]["reason"] == "stale: trained on version 0" and got[2]["seconds"] == 2.0
    assert got[3]["seconds"] is None
    trimmed = status.task_statuses(tasks[:2], rule="trimmed_mean", verdicts=[(False, 0.123456)] * 2)
    assert [e["trimmed_share"] for e in trimmed] == [0.1235, 0.1235]


def test_the_in_process_transport_tells_each_outcome_before_the_next_client_runs() -> None:
    from fedguard.protocol.transport import Delivered, Failed
    from fedguard.simulation.inprocess import InProcessTransport

    events: list[tuple] = []

    def handler(cid: int, payload: bytes) -> bytes:
        events.append(("ran", cid))
        if cid == 2:
            raise ConnectionError("unplugged")
        return payload[::-1]

    transport = InProcessTransport(handler, [1, 2, 3])
    transport.watch(
        lambda o: events.append(
            ("told", o.client_id, type(o).__name__, getattr(o, "payload", None))
        )
    )
    outcomes = transport.exchange({1: b"ab", 2: b"cd", 3: b"ef"}, deadline_s=None)
    assert events == [
        ("ran", 1),
        ("told", 1, "Delivered", b"ba"),
        ("ran", 2),
        ("told", 2, "Failed", None),
        ("ran", 3),
        ("told", 3, "Delivered", b"fe"),
    ]
    assert isinstance(outcomes[0], Delivered) and isinstance(outcomes[1], Failed)
    assert outcomes[1].reason == "ConnectionError: unplugged"
    transport.watch(None)
    transport.exchange({1: b"x"}, deadline_s=None)
    assert events[-1] == ("ran", 1)  # no watcher, nothing told


def test_the_driver_passes_a_rounds_fit_outcomes_to_its_watcher() -> None:
    import torch

    from fedguard.algorithms.optimizers import server as server_optimizers
    from fedguard.protocol import messages
    from fedguard.protocol.driver import RoundDriver
    from fedguard.protocol.fedopt import FedOpt
    from fedguard.simulation.inprocess import InProcessTransport

    def handler(cid: int, payload: bytes) -> bytes:
        task = messages.decode(payload, messages.FitTask)
        if cid == 3:
            raise ConnectionError("unplugged")
        update = torch.full((4,), float(cid))
        return messages.encode(messages.FitReply(task.round, cid, update, 10, {"train_loss": 0.5}))

    transport = InProcessTransport(handler, [0, 1, 2, 3, 4])
    strategy = FedOpt(server_optimizers.ServerOptimizerConfig(), {})
    driver = RoundDriver(transport, strategy, dim=4, clients_per_round=5, min_clients=1, seed=0)
    seen: list[tuple[int, int, str]] = []
    driver.watch(lambda r, o: seen.append((r, o.client_id, type(o).__name__)))
    params = torch.zeros(4)
    result = driver.fit_round(7, params, strategy.init(params))
    # every client, in the order they answered, client 3's failure among them
    assert result.sampled == [0, 1, 2, 3, 4]
    assert seen == [(7, c, "Failed" if c == 3 else "Delivered") for c in range(5)]
    assert result.problems == [(3, "error: ConnectionError: unplugged")]
    assert torch.equal(result.params, torch.full((4,), 1.75))  # the mean of 0, 1, 2 and 4
    # the round's end took the driver's watcher off the transport
    (late,) = transport.exchange({0: b"not a task"}, deadline_s=None)
    assert late.client_id == 0 and len(seen) == 5


def test_the_dashboard_over_https_answers_with_its_ca_and_refuses_plain_http(
    tmp_path: Path,
) -> None:
    import ssl

    from fedguard.runtime import certs

    pki = certs.make_dev_pki(tmp_path / "pki", client_ids=[])
    run = tmp_path / "run"
    run.mkdir()
    writer = status.StatusWriter(
        run, name="tls-run", rounds_planned=7, max_epsilon=None, delta=None, mode="sync"
    )
    writer.round_started(1, [0, 1])
    port = free_port()
    options = serve.DashboardOptions(
        f"127.0.0.1:{port}", tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    dashboard = serve.Background([run], options)
    dashboard.start()
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca_cert))
        url = f"https://127.0.0.1:{port}/api/runs"
        with urllib.request.urlopen(url, timeout=10, context=trusted) as response:
            body = json.loads(response.read())
        (seen,) = body["runs"]
        assert seen["name"] == "tls-run" and seen["status"]["rounds_planned"] == 7
        assert [c["client"] for c in seen["status"]["current"]["clients"]] == [0, 1]
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context())
        # plain HTTP: the server closes the connection without an answer (RemoteDisconnected)
        with pytest.raises(ConnectionResetError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=10)
    finally:
        dashboard.stop()
