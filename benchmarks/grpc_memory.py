"""Server memory while one authenticated client floods the open task of its round with pushes.

A review measured the deployed server's RSS going from 0.39 to 1.56 GB when several concurrent
pushes for one open task each buffered their payload under the server-wide 1 GiB cap, for a
task whose honest reply is a few hundred bytes. The server now refuses a reply from its header
when it announces more than its task can need (``grpc_checks.TaskInfo.reply_limit``), refuses
data beyond the announced size, and admits one push per task at a time. This measures what is
left of the attack.

Each case starts a real deployed server, ``python -m fedguard.cli server`` with TLS and a token
file, in a subprocess, on a one-client experiment (logistic regression on synthetic 1x6x6 inputs
in 3 classes, one round: the fit task's honest reply is well under 1 KiB). The benchmark is that
client: it pulls round 1's fit task, then opens ``N`` pushes for that task at once, each on its
own TLS connection with fresh credentials, and each trying to stream ``--payload-mib`` MiB in
1 MiB chunks:

* ``oversized_header``: the header announces the whole payload (refused from the header);
* ``understated_header``: the header announces the honest reply's size and the data runs on
  (refused at the first chunk that exceeds it);
* ``legitimate_reply``: one push of the honest reply (the client's own training), for scale.

While the pushes run, a thread samples the server's ``VmRSS`` from ``/proc/PID/status`` every
5 ms; the kernel's peak mark (``VmHWM``) is reset just before the pushes (``/proc/PID/clear_refs``
= 5) and read after them, and the peak reported is the larger of the two. Afterwards the client
answers its task honestly with ``fedguard.runtime.grpc_client.serve``; every case checks that the
run then completes (server exit code 0, ``summary.json`` status ``completed``).

    python benchmarks/grpc_memory.py                     # N = 1, 8, 25; 256 MiB each; ~1.5 min
    python benchmarks/grpc_memory.py --pushes 1 4 --payload-mib 64 --out /tmp/memory.json

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import tomli_w

from fedguard.experiment import deployment as grpc_deploy
from fedguard.runtime import (
    auth,
    certs,
    grpc_chunks,
    grpc_client,
    grpc_launch,
    grpc_server,
    grpc_tls,
)
from fedguard.runtime.proto import wire_pb2, wire_pb2_grpc

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "grpc_memory.json"
PUSH_TIMEOUT_S = 120.0
SAMPLE_S = 0.005
CONFIG = {
    "experiment": {"name": "grpc_memory", "seed": 3, "rounds": 1},
    "data": {
        "dataset": "synthetic",
        "num_clients": 1,
        "synthetic_samples": 200,
        "synthetic_shape": [1, 6, 6],
        "synthetic_classes": 3,
        "partition": "iid",
    },
    "model": {"name": "logistic_regression"},
    "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
    "server": {"strategy": "fedavg", "clients_per_round": 1, "min_clients": 1},
}


# -- the server process and its memory ------------------------------------------------------------
def _status_bytes(pid: int, field_name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field_name}")


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` to its current RSS; False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Sampler:
    """Samples a process's ``VmRSS`` every :data:`SAMPLE_S` seconds until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = _status_bytes(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, _status_bytes(self.pid, "VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class _Federation:
    """One deployed server in a subprocess, and what its single client needs to reach it."""

    folder: Path
    address: str = field(default_factory=lambda: f"127.0.0.1:{grpc_launch.free_port()}")
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.folder / "experiment.toml"

    @property
    def run(self) -> Path:
        return self.folder / "run"

    def start(self) -> None:
        auth.make_tokens(self.folder, [0])
        certs.make_dev_pki(self.folder, client_ids=[])
        self.config.write_text(tomli_w.dumps(CONFIG))
        command = [
            sys.executable,
            "-m",
            "fedguard.cli",
            "server",
            str(self.config),
            "--address",
            self.address,
            "--tls-cert",
            str(self.folder / "server.pem"),
            "--tls-key",
            str(self.folder / "server.key"),
            "--tokens",
            str(self.folder / "tokens.json"),
            "--out",
            str(self.run),
            "--round-deadline",
            str(PUSH_TIMEOUT_S * 2),
            "--quiet",
        ]
        log = (self.folder / "server.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not started")
        return self.process.pid

    def settings(self) -> grpc_client.ClientSettings:
        token = (self.folder / "client-0.token").read_text().strip().encode()
        tls = grpc_tls.ClientTls(self.folder / "ca.pem")
        return grpc_client.ClientSettings(self.address, 0, token, tls, give_up_after_s=60.0)

    def channel(self) -> grpc.Channel:
        ca = (self.folder / "ca.pem").read_bytes()
        return grpc.secure_channel(
            self.address,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.max_receive_message_length", grpc_chunks.MAX_MESSAGE_BYTES)],
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# -- the client's calls ---------------------------------------------------------------------------
def _credentials(settings: grpc_client.ClientSettings) -> wire_pb2.Credentials:
    c = auth.fresh_credentials(settings.client_id, settings.token)
    return wire_pb2.Credentials(
        client_id=c.client_id, token=c.token, timestamp_ms=c.timestamp_ms, nonce=c.nonce
    )


def _pull_task(fed: _Federation, timeout_s: float = 180.0) -> tuple[str, bytes]:
    """Round 1's fit task, pulled with raw calls once the server listens: (task id, payload)."""
    settings = fed.settings()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if fed.process is not None and fed.process.poll() is not None:
            raise RuntimeError(f"the server exited early; see {fed.folder / 'server.log'}")
        channel = fed.channel()
        try:
            stub = wire_pb2_grpc.FederationStub(channel)
            request = wire_pb2.PullRequest(credentials=_credentials(settings))
            chunks = list(stub.Pull(request, timeout=30))
            if chunks and chunks[0].status == wire_pb2.PULL_STATUS_TASK:
                return chunks[0].header.task_id, b"".join(c.data for c in chunks)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.5)
        finally:
            channel.close()
    raise RuntimeError(f"no task within {timeout_s:g} s")


@dataclass(frozen=True)
class _Push:
    """One push: the size its header announces, its digest, and the data it streams."""

    announced: int
    sha256: bytes
    data_bytes: int
    legitimate: bytes | None = None  # the whole payload of a legitimate reply


def _chunks(settings: grpc_client.ClientSettings, task_id: str, push: _Push) -> Iterator[Any]:
    header = wire_pb2.PayloadHeader(task_id=task_id, size=push.announced, sha256=push.sha256)
    if push.legitimate is not None:
        pieces: Iterator[bytes] = (bytes(p) for p in grpc_chunks.pieces(push.legitimate))
    else:
        block = bytes(grpc_chunks.CHUNK_BYTES)
        count = -(-push.data_bytes // grpc_chunks.CHUNK_BYTES)
        pieces = (block for _ in range(count))
    for i, piece in enumerate(pieces):
        if i == 0:
            yield wire_pb2.ReplyChunk(credentials=_credentials(settings), header=header, data=piece)
        else:
            yield wire_pb2.ReplyChunk(data=piece)


def _push_all(fed: _Federation, task_id: str, push: _Push, count: int) -> Counter[str]:
    """``count`` pushes of ``push`` at once, each on its own connection: their status codes."""
    settings = fed.settings()
    channels = [fed.channel() for _ in range(count)]
    for channel in channels:  # connect (TLS handshake) before the pushes start together
        grpc.channel_ready_future(channel).result(timeout=30)
    start = threading.Barrier(count)
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(channel: grpc.Channel) -> None:
        stub = wire_pb2_grpc.FederationStub(channel)
        start.wait()
        try:
            stub.Push(_chunks(settings, task_id, push), timeout=PUSH_TIMEOUT_S)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes[code] += 1

    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in channels]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PUSH_TIMEOUT_S + 30)
    for channel in channels:
        channel.close()
    return codes


# -- one case ---------------------------------------------------------------------------------------
def run_case(case: str, pushes: int, payload_bytes: int) -> dict[str, Any]:
    """One fresh server, one case; the row of the results."""
    with tempfile.TemporaryDirectory() as folder:
        fed = _Federation(Path(folder))
        fed.start()
        try:
            task_id, task = _pull_task(fed)
            honest = grpc_deploy.demo_app(fed.config, 0).handle(0, task)
            digest = hashlib.sha256(honest).digest()
            push = {
                "legitimate_reply": _Push(len(honest), digest, len(honest), honest),
                "oversized_header": _Push(payload_bytes, digest, payload_bytes),
                "understated_header": _Push(len(honest), digest, payload_bytes),
            }[case]
            time.sleep(0.5)  # let the server settle after serving the task
            before = _status_bytes(fed.pid, "VmRSS")
            reset = _reset_peak(fed.pid)
            sampler = _Sampler(fed.pid)
            started = time.perf_counter()
            codes = _push_all(fed, task_id, push, pushes)
            seconds = time.perf_counter() - started
            time.sleep(0.2)
            peak = sampler.stop()
            if reset:
                peak = max(peak, _status_bytes(fed.pid, "VmHWM"))
            after = _status_bytes(fed.pid, "VmRSS")
            if case != "legitimate_reply":  # the task is still open: answer it honestly
                grpc_client.serve(fed.settings(), grpc_deploy.demo_app(fed.config, 0).handle)
            else:
                grpc_client.serve(fed.settings(), lambda cid, payload: honest)
            if fed.process is None or fed.process.wait(120) != 0:
                raise RuntimeError(f"the server failed; see {fed.folder / 'server.log'}")
            summary = json.loads((fed.run / "summary.json").read_text())
        finally:
            fed.stop()
    return {
        "case": case,
        "concurrent_pushes": pushes,
        "payload_bytes_attempted": push.data_bytes * pushes,
        "server_rss_before_bytes": before,
        "server_rss_peak_bytes": peak,
        "pushes_rejected": pushes - codes.get("OK", 0),
        "seconds": seconds,
        "server_rss_after_bytes": after,
        "status_codes": dict(sorted(codes.items())),
        "peak_mark_reset": reset,
        "run_completed": summary["status"] == "completed",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, nargs="+", default=[1, 8, 25])
    parser.add_argument("--payload-mib", type=int, default=256)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    payload = args.payload_mib << 20
    cases = [("legitimate_reply", 1)] + [
        (case, n) for case in ("oversized_header", "understated_header") for n in args.pushes
    ]
    rows = []
    for case, n in cases:
        row = run_case(case, n, payload)
        rows.append(row)
        mib = 1 << 20
        print(
            f"{case:20s} {n:3d} pushes: RSS {row['server_rss_before_bytes'] / mib:7.1f} -> "
            f"peak {row['server_rss_peak_bytes'] / mib:7.1f} MiB "
            f"(+{(row['server_rss_peak_bytes'] - row['server_rss_before_bytes']) / mib:.1f}), "
            f"{row['pushes_rejected']} rejected {row['status_codes']}, {row['seconds']:.2f} s",
            flush=True,
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
            "load_average": os.getloadavg(),
        },
        "notes": (
            "One deployed server per row (fedguard server, TLS, tokens; a one-client logistic "
            "regression whose honest fit reply is under 1 KiB), round 1's fit task open. "
            "payload_bytes_attempted: the data all of the row's pushes together tried to stream "
            f"({args.payload_mib} MiB each for the attacks, in 1 MiB chunks). Each push has its "
            "own TLS connection and fresh credentials of the one client. Server RSS from "
            "/proc/PID/status: before = VmRSS just before the pushes; peak = the larger of VmRSS "
            "sampled every 5 ms and VmHWM after a reset of the peak mark; after = VmRSS 0.2 s "
            "after the last push ended. status_codes: how each push ended (RESOURCE_EXHAUSTED: "
            "refused from its header, or beyond the admission limits of "
            f"{grpc_server.MAX_UNAUTHENTICATED_PER_HOST} unauthenticated calls per host and "
            f"{grpc_server.MAX_CALLS_PER_CLIENT} calls per client; ABORTED: another push for the "
            "task was in flight; "
            "INVALID_ARGUMENT: more data than its header announced). Afterwards the client "
            "answered its task honestly and every run completed (run_completed)."
        ),
        "payload_mib_per_push": args.payload_mib,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
