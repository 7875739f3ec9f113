"""``fedguard launch``: one server and N client processes on loopback, stopped together.

For demos and tests: throwaway development certificates and tokens are made in a temporary
folder (TLS by default; plain text only with ``insecure``), the server listens on a free
loopback port, and every child process is stopped when the server exits, on Ctrl-C, or on any
error, so a launch never leaves processes behind. The server is ``fedguard server``: it loads
no data set (clients register their sizes and evaluate on their held-out data); each client is
``fedguard client FILE.toml --client-id N``, which loads the experiment's public data set and
keeps its own partition (the demo path).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fedguard.runtime import certs, he_keys, identities

STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_all(processes: Sequence[subprocess.Popen]) -> None:
    """Terminate every process still running, then kill those that outlive the grace period."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + STOP_GRACE_S
    for p in processes:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def security_args(directory: Path, client_ids: Sequence[int], *, insecure: bool):
    """Make dev certificates and tokens in ``directory``; the server's and each client's flags."""
    tokens = identities.make_credentials(directory, client_ids)
    registry = str(directory / identities.REGISTRY_FILE)
    server = ["--tokens", str(directory / "tokens.json"), "--identities", registry]
    clients = {
        cid: [
            "--token-file",
            str(tokens[cid]),
            "--identity",
            str(identities.identity_file(directory, cid)),
            "--identities",
            registry,
        ]
        for cid in client_ids
    }
    if insecure:
        return [*server, "--insecure"], {cid: [*a, "--insecure"] for cid, a in clients.items()}
    pki = certs.make_dev_pki(directory, client_ids=[])
    server += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return server, {cid: [*a, "--ca", str(pki.ca_cert)] for cid, a in clients.items()}


def launch(
    config: Path,
    clients: int,
    *,
    out: Path | None,
    insecure: bool = False,
    resume: bool = False,
    overrides: Sequence[str] = (),
    round_deadline_s: float | None = None,
    dashboard: str | None = None,
    he_scheme: str | None = None,
) -> int:
    """Run the experiment with ``clients`` client processes; the server's exit code.
    ``dashboard``: HOST:PORT where the server serves the live dashboard (loopback);
    ``he_scheme``: under ``[secure_aggregation] mode = "ckks"``, the scheme of a throwaway HE key
    (the clients get the key file, the server the key-less parameter file)."""
    python = [sys.executable, "-m", "fedguard.cli"]
    sets = [a for o in overrides for a in ("--set", o)]
    address = f"127.0.0.1:{free_port()}"
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="fedguard-launch-") as tmp:
        server_args, client_args = security_args(Path(tmp), range(clients), insecure=insecure)
        if he_scheme is not None:
            key, params = he_keys.make_keys(Path(tmp), he_scheme)
            server_args += ["--he-params", str(params)]
            client_args = {cid: [*a, "--he-key", str(key)] for cid, a in client_args.items()}
        try:
            command = [*python, "server", str(config), "--address", address, *server_args, *sets]
            if out is not None:
                command += ["--out", str(out)]
            if resume:
                command.append("--resume")
            if round_deadline_s is not None:
                command += ["--round-deadline", repr(float(round_deadline_s))]
            if dashboard is not None:
                command += ["--dashboard", dashboard]
            server = subprocess.Popen(command)
            processes.append(server)
            for cid in range(clients):
                processes.append(
                    subprocess.Popen(
                        [
                            *python,
                            "client",
                            str(config),
                            "--server",
                            address,
                            "--client-id",
                            str(cid),
                            *client_args[cid],
                            *sets,
                        ]
                    )
                )
            code = server.wait()
            for p in processes[1:]:
                try:
                    p.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    break
            return code
        finally:
            stop_all(processes)
