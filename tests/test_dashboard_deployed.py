"""A deployed run watched live: ``fedguard server --dashboard`` with viewer tokens, a client
process, and the test reading the dashboard's JSON (what the page draws) mid-run.

Client 1 holds round 2's training until the test creates a file, so the test sees the run at a
known point without timing: round 1 finished, round 2 in progress, client 0's reply of round 2
already shown as it arrived over gRPC (before the round's end) and client 1 still sampled. The
dashboard refuses a request without the viewer token.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from test_grpc_harness import CTX, Federation, make_security, wait_for, write_config

from fedguard.observe import access
from fedguard.runtime import grpc_launch

ROUNDS = 2
SECTIONS = {
    "experiment": {"rounds": ROUNDS, "name": "deployed"},
    "data": {"num_clients": 2},
    "server": {"clients_per_round": 2, "deadline_s": 120.0},
}


def _server_cli(argv: list[str], log_path: Path) -> None:
    """``fedguard server ...`` in a fresh process (its exit code is the process's)."""
    import logging
    import sys

    import torch

    from fedguard import cli

    torch.set_num_threads(1)
    logging.basicConfig(filename=log_path, level=logging.INFO, force=True)
    sys.exit(cli.main(argv))


def _clients(config: Path, address: str, tokens: dict[int, bytes], gate: Path) -> None:
    """``fedguard client`` for each of ``tokens``' clients, on threads of one process (one
    process start, not two); client 1 trains round 2 and later only once ``gate`` exists."""
    import threading

    import torch

    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.protocol import messages
    from fedguard.runtime import grpc_client

    torch.set_num_threads(1)

    def serve(client_id: int) -> None:
        app = grpc_deploy.demo_app(config, client_id)

        def handler(cid: int, payload: bytes) -> bytes:
            fit = messages.kind_of(payload) == "FitTask"
            if cid == 1 and fit and messages.decode(payload).round >= 2:
                end = time.monotonic() + 120
                while not gate.exists() and time.monotonic() < end:
                    time.sleep(0.05)
            return app.handle(cid, payload)

        settings = grpc_client.ClientSettings(
            address,
            client_id,
            tokens[client_id],
            None,
            insecure=True,
            backoff_max_s=1.0,
            give_up_after_s=60.0,
        )
        grpc_client.serve(settings, handler)

    threads = [threading.Thread(target=serve, args=(cid,)) for cid in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _get(url: str, token: str | None) -> tuple[int, dict | None]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def test_a_deployed_run_is_watched_live_with_a_viewer_token(tmp_path: Path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    sec = make_security(tmp_path / "sec", range(2), tls=False)
    viewer = access.make_viewer(tmp_path / "sec", "ops").read_text().strip()
    fed = Federation(config, tmp_path / "run", sec)
    dashboard = f"127.0.0.1:{grpc_launch.free_port()}"
    url = f"http://{dashboard}/api/runs"
    gate = tmp_path / "go"
    argv = [
        "server",
        str(config),
        "--address",
        fed.address,
        "--tokens",
        str(sec.tokens()),
        "--insecure",
        "--out",
        str(fed.out),
        "--quiet",
        "--dashboard",
        dashboard,
        "--viewer-tokens",
        str(tmp_path / "sec" / access.VIEWERS_FILE),
    ]
    server = CTX.Process(target=_server_cli, args=(argv, fed.log), daemon=True)
    tokens = {cid: sec.token(cid) for cid in range(2)}
    clients = [CTX.Process(target=_clients, args=(config, fed.address, tokens, gate), daemon=True)]
    seen: dict = {}
    try:
        server.start()
        for c in clients:
            c.start()

        def round_2_with_client_0_replied() -> bool:
            code, body = _get(url, viewer)
            if code != 200 or body is None:
                return False
            run = body["runs"][0]
            current = (run.get("status") or {}).get("current") or {}
            seen.update(run)
            replied = [c["client"] for c in current.get("clients", []) if c["status"] != "sampled"]
            in_round_2 = current.get("round") == 2 and current.get("phase") == "training"
            return in_round_2 and replied == [0]

        wait_for(round_2_with_client_0_replied, 120, "client 0's reply of round 2 on the dashboard")
        assert _get(url, None)[0] == 401  # no viewer token, nothing shown
        assert _get(url, "not-a-token")[0] == 401
        assert seen["status"]["rounds_done"] == 1 and seen["status"]["state"] == "running"
        assert [r["round"] for r in seen["metrics"]] == [1]
        clients_now = seen["status"]["current"]["clients"]
        assert [(c["client"], c["status"]) for c in clients_now] == [(0, "replied"), (1, "sampled")]
        assert clients_now[0]["seconds"] > 0 and clients_now[1]["seconds"] is None
        last = seen["status"]["last"]
        assert [c["status"] for c in last["clients"]] == ["replied", "replied"]
        assert all(c["seconds"] > 0 for c in last["clients"])
        gate.write_text("go")
        server.join(120)
        assert server.exitcode == 0, fed.log.read_text()
    finally:
        gate.write_text("go")
        for p in [server, *clients]:
            if p.is_alive():
                p.kill()
                p.join(5)
    final = json.loads((fed.out / "status.json").read_text())
    assert final["state"] == "completed" and final["rounds_done"] == ROUNDS
    rows = [json.loads(x) for x in (fed.out / "metrics.jsonl").read_text().splitlines()]
    assert final["last"]["bytes_up"] == rows[-1]["bytes_up"]
