"""Helpers for the multi-process gRPC tests, and unit tests of the pieces they rely on.

Servers and clients run as separate processes forked from a forkserver that has imported torch
and fedguard once, so a test with six processes does not pay six interpreter start-ups. Every
process is bounded: helpers wait with timeouts and :func:`stop` kills whatever is left.
"""

from __future__ import annotations

import enum
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tomli_w

from conftest import tiny_config
from fedguard.runtime import auth, certs, grpc_chunks, grpc_launch, grpc_tls, identities
from fedguard.runtime.proto import wire_pb2, wire_pb2_grpc

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(
    # torch._dynamo is what the first optimizer step imports (about 800 modules)
    [
        "torch",
        "torch._dynamo",
        "sklearn.metrics",
        "fedguard.experiment.runner",
        "fedguard.experiment.deployment",
    ]
)


# A deployed server holds no data set: its test_loss is the clients' losses on their shares of
# the test split, added up (weighted by count), where the simulator computes one loss over the
# whole split. The same numbers summed in another order (float32 batch sums) differ by about
# 1e-7 relatively; the accuracy, counted from the clients' confusion matrices, is exact.
LOSS_REL = 1e-6


def losses_match(deployed: list[float | None], simulated: list[float | None]) -> bool:
    """The deployed run's test losses equal the simulated run's within :data:`LOSS_REL`."""
    return len(deployed) == len(simulated) and all(
        (d is None and s is None)
        or (d is not None and s is not None and d == pytest.approx(s, rel=LOSS_REL))
        for d, s in zip(deployed, simulated, strict=True)
    )


class Behaviour(enum.StrEnum):
    NORMAL = "normal"
    HANG_IN_ROUND_2 = "hang_in_round_2"  # writes a marker, then never answers round 2's fit task
    VANISH_AT_UNMASK = "vanish_at_unmask"  # exits as soon as it is asked to unmask
    SLOW = "slow"  # takes 0.3 s longer per fit task, so a test can stop the server mid-run
    # answers round 1's fit task, then stops cleanly (a restart between rounds)
    STOP_AFTER_ROUND_1 = "stop_after_round_1"
    # trains on round 1's fit task, then exits before its reply leaves (its reply is lost)
    VANISH_AFTER_TRAINING_1 = "vanish_after_training_1"


@dataclass(frozen=True)
class Security:
    """Dev certificates and tokens for one test federation; ``mutual``: client certificates
    (mutual TLS) instead of tokens."""

    directory: Path
    tls: bool = True
    mutual: bool = False

    def server_tls(self) -> grpc_tls.ServerTls | None:
        d = self.directory
        if not self.tls:
            return None
        return grpc_tls.ServerTls(
            d / "server.pem", d / "server.key", d / "ca.pem" if self.mutual else None
        )

    def tokens(self) -> Path | None:
        return None if self.mutual else self.directory / "tokens.json"

    def client_tls(self, client_id: int) -> grpc_tls.ClientTls | None:
        d = self.directory
        if not self.tls:
            return None
        if not self.mutual:
            return grpc_tls.ClientTls(d / "ca.pem")
        return grpc_tls.ClientTls(
            d / "ca.pem", d / f"client-{client_id}.pem", d / f"client-{client_id}.key"
        )

    def identities(self) -> Path | None:
        """The public identity registry ``fedguard tokens`` wrote (None under mutual TLS)."""
        path = self.directory / "identities.json"
        return None if self.mutual or not path.exists() else path

    def he_params(self) -> Path | None:
        """The server's HE parameter file, where `fedguard he-keys` wrote one here."""
        path = self.directory / "he-server.params"
        return path if path.exists() else None

    def he_key(self) -> Path | None:
        """The clients' HE key file, where `fedguard he-keys` wrote one here."""
        path = self.directory / "he-client.key"
        return path if path.exists() else None

    def token(self, client_id: int) -> bytes:
        if self.mutual:
            return b""
        return (self.directory / f"client-{client_id}.token").read_text().strip().encode()


def make_security(
    directory: Path, client_ids: Iterable[int], *, tls: bool = True, mutual: bool = False
) -> Security:
    ids = list(client_ids)
    if mutual:
        certs.make_dev_pki(directory, client_ids=ids)
        return Security(directory, tls=True, mutual=True)
    identities.make_credentials(directory, ids)  # tokens and identity keys, as `fedguard tokens`
    if tls:
        certs.make_dev_pki(directory, client_ids=[])
    return Security(directory, tls)


def write_config(path: Path, **sections: dict) -> Path:
    path.write_text(tomli_w.dumps(tiny_config(**sections)))
    return path


def _quiet_torch() -> None:
    import torch

    torch.set_num_threads(1)


def server_main(
    config: Path, out: Path, address: str, sec: Security, resume: bool, log_path: Path
) -> None:
    """A server process: ``fedguard server`` without the command line around it."""
    import logging

    from fedguard.experiment import deployment as grpc_deploy

    _quiet_torch()
    logging.basicConfig(
        filename=log_path, level=logging.INFO, force=True, format="%(relativeCreated)d %(message)s"
    )
    options = grpc_deploy.ServerOptions(
        address,
        sec.server_tls(),
        sec.tokens(),
        insecure=not sec.tls,
        poll_s=2.0,
        identities=sec.identities(),
        he_params=sec.he_params(),
    )
    grpc_deploy.serve(config, options, out=out, resume=resume)


def client_main(
    config: Path,
    address: str,
    client_id: int,
    sec: Security,
    behaviour: Behaviour,
    marker: Path,
    state_dir: Path | None = None,
) -> None:
    """A client process: ``fedguard client`` (with ``--state-dir state_dir`` if given) with an
    optional scripted misbehaviour."""
    import threading

    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.protocol import messages
    from fedguard.runtime import grpc_client

    _quiet_torch()
    app = grpc_deploy.demo_app(config, client_id, state_dir=state_dir)
    stop = threading.Event()
    registry = sec.identities()
    if registry is not None:  # as `fedguard client --identity ... --identities ...`
        key = sec.directory / f"client-{client_id}.identity"
        grpc_deploy.identify(app, key, registry, client_id)
    he_key = sec.he_key()
    if he_key is not None:  # as `fedguard client --he-key he-client.key`
        from fedguard.experiment import config as config_mod

        grpc_deploy.give_he_key(app, he_key, config_mod.load(config))

    def handler(cid: int, payload: bytes) -> bytes:
        kind = messages.kind_of(payload)
        if behaviour is Behaviour.VANISH_AT_UNMASK and kind == "SecAggUnmaskRequest":
            marker.write_text("vanished")
            os._exit(17)
        if behaviour is Behaviour.SLOW and kind == "FitTask":
            time.sleep(0.3)
        if behaviour is Behaviour.HANG_IN_ROUND_2 and kind == "FitTask":
            task = messages.decode(payload)
            if task.round == 2:
                marker.write_text("hanging")
                time.sleep(3600)
        reply = app.handle(cid, payload)
        after_1 = (Behaviour.STOP_AFTER_ROUND_1, Behaviour.VANISH_AFTER_TRAINING_1)
        if behaviour in after_1 and kind == "FitTask" and messages.decode(payload).round == 1:
            if behaviour is Behaviour.VANISH_AFTER_TRAINING_1:
                marker.write_text("vanished")
                os._exit(17)
            marker.write_text("stopped")
            stop.set()  # the reply is pushed, then the client returns
        return reply

    settings = grpc_client.ClientSettings(
        address,
        client_id,
        sec.token(client_id),
        sec.client_tls(client_id),
        insecure=not sec.tls,
        backoff_max_s=1.0,
        give_up_after_s=60.0,
    )
    grpc_client.serve(settings, handler, stop=stop)


def cli_main(argv: list[str], cwd: Path, stdout: Path, stderr: Path) -> None:
    """``fedguard ARGV`` (``cli.main``) as a process of its own, run from ``cwd`` with its
    standard output and error written to ``stdout`` and ``stderr`` (the same file if they are
    equal); its exit code is the command's. Started through :data:`CTX`, the process is forked
    from the forkserver, a fresh interpreter that has imported torch and fedguard and holds
    nothing of the test process; the imports are all that it saves over ``python -m
    fedguard.cli`` (about 5 s per process on two loaded cores; ``test_grpc_launch.py`` still
    starts every process of a deployment with ``python -m fedguard.cli``)."""
    import sys

    _quiet_torch()
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if stdout == stderr else os.O_TRUNC)
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from fedguard import cli

    sys.exit(cli.main(argv))


def start_cli(argv: list[str], cwd: Path, log: Path) -> multiprocessing.process.BaseProcess:
    """Start ``fedguard ARGV`` in its own process (:func:`cli_main`), output and errors to
    ``log``."""
    log.write_bytes(b"")
    process = CTX.Process(target=cli_main, args=(argv, cwd, log, log), daemon=True)
    process.start()
    return process


@dataclass(frozen=True)
class CliResult:
    """What a ``fedguard`` command run by :func:`run_cli` left: as ``subprocess.run`` reports."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*argv: str, cwd: Path, timeout_s: float = 300.0) -> CliResult:
    """Run ``fedguard ARGV`` from ``cwd`` in its own process (:func:`cli_main`) to its end."""
    with tempfile.TemporaryDirectory(prefix="fedguard-cli-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = CTX.Process(target=cli_main, args=(list(argv), cwd, out, err), daemon=True)
        process.start()
        process.join(timeout_s)
        if process.exitcode is None:
            process.kill()
            process.join(5)
            raise AssertionError(f"fedguard {' '.join(argv)} did not finish in {timeout_s} s")
        return CliResult(process.exitcode, out.read_text(), err.read_text())


@dataclass
class Federation:
    """The processes of one test federation; :meth:`stop` kills them all."""

    config: Path
    out: Path
    sec: Security
    address: str = field(default_factory=lambda: f"127.0.0.1:{grpc_launch.free_port()}")
    server: multiprocessing.Process | None = None
    clients: dict[int, multiprocessing.Process] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.out.parent / f"{self.out.name}-server.log"

    def start_server(self, *, resume: bool = False) -> None:
        args = (self.config, self.out, self.address, self.sec, resume, self.log)
        self.server = CTX.Process(target=server_main, args=args, daemon=True)
        self.server.start()

    def start_client(
        self, cid: int, behaviour: Behaviour = Behaviour.NORMAL, state_dir: Path | None = None
    ) -> Path:
        marker = self.out.parent / f"client-{cid}-{behaviour}.marker"
        args = (self.config, self.address, cid, self.sec, behaviour, marker, state_dir)
        self.clients[cid] = CTX.Process(target=client_main, args=args, daemon=True)
        self.clients[cid].start()
        return marker

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.kill()  # SIGKILL: no chance to save anything
        self.server.join(5)

    def kill_client(self, cid: int) -> None:
        self.clients[cid].kill()
        self.clients[cid].join(5)

    def wait_server(self, timeout_s: float) -> int:
        assert self.server is not None
        self.server.join(timeout_s)
        assert self.server.exitcode is not None, f"the server did not finish in {timeout_s} s"
        return self.server.exitcode

    def wait_clients(self, timeout_s: float) -> dict[int, int | None]:
        end = time.monotonic() + timeout_s
        for p in self.clients.values():
            p.join(max(0.0, end - time.monotonic()))
        return {cid: p.exitcode for cid, p in self.clients.items()}

    def stop(self) -> None:
        for p in [self.server, *self.clients.values()]:
            if p is not None and p.is_alive():
                p.kill()
                p.join(5)

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def raw_pull(
    address: str,
    ca: bytes,
    creds: auth.Credentials,
    *,
    cert: bytes | None = None,
    key: bytes | None = None,
) -> tuple[grpc.StatusCode, int]:
    """A raw Pull with ``creds`` (presenting ``cert`` if given): its status and chunks received."""
    tls = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    channel = grpc.secure_channel(address, tls)
    try:
        request = wire_pb2.PullRequest(
            credentials=wire_pb2.Credentials(
                client_id=creds.client_id,
                token=creds.token,
                timestamp_ms=creds.timestamp_ms,
                nonce=creds.nonce,
            )
        )
        received = 0
        try:
            for _ in wire_pb2_grpc.FederationStub(channel).Pull(request, timeout=10):
                received += 1
        except grpc.RpcError as exc:
            return exc.code(), received
        return grpc.StatusCode.OK, received
    finally:
        channel.close()


def wait_for(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def final_params(run_dir: Path):
    from fedguard.experiment import checkpoint

    ck = checkpoint.latest(run_dir / "checkpoints")
    assert ck is not None
    return ck.round, ck.tensors["params"]


# -- unit tests of the pieces -----------------------------------------------------------------
def test_chunks_round_trip_and_refusals() -> None:
    payload = os.urandom(2 * grpc_chunks.CHUNK_BYTES + 17)
    header = grpc_chunks.header_of("t", payload)
    pieces = list(grpc_chunks.pieces(payload))
    assert [len(p) for p in pieces] == [grpc_chunks.CHUNK_BYTES, grpc_chunks.CHUNK_BYTES, 17]
    a = grpc_chunks.Assembler(header, max_bytes=len(payload))
    for p in pieces:
        a.add(bytes(p))
    assert a.finish() == payload
    with pytest.raises(grpc_chunks.WireError) as big:
        grpc_chunks.Assembler(header, max_bytes=len(payload) - 1)
    assert big.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = grpc_chunks.Assembler(grpc_chunks.Header("t", 3, bytes(32)), max_bytes=10)
    bad.add(b"abc")
    with pytest.raises(grpc_chunks.WireError) as digest:
        bad.finish()
    assert digest.value.code is grpc.StatusCode.DATA_LOSS


def test_authenticator_refuses_wrong_revoked_replayed_and_stale(tmp_path) -> None:
    tokens = auth.make_tokens(tmp_path, [0, 1])
    now = [1_000.0]
    a = auth.Authenticator(tmp_path / "tokens.json", clock=lambda: now[0])
    token0 = tokens[0].read_text().strip().encode()
    good = auth.fresh_credentials(0, token0, clock=lambda: now[0])
    a.check(good, None)
    with pytest.raises(auth.AuthError, match="replayed"):
        a.check(good, None)
    with pytest.raises(auth.AuthError, match="wrong token"):
        a.check(auth.fresh_credentials(0, b"guess", clock=lambda: now[0]), None)
    with pytest.raises(auth.AuthError, match="unknown"):
        a.check(auth.fresh_credentials(7, token0, clock=lambda: now[0]), None)
    stale = auth.fresh_credentials(0, token0, clock=lambda: now[0] - 301.0)
    with pytest.raises(auth.AuthError, match="window"):
        a.check(stale, None)
    auth.revoke(tmp_path / "tokens.json", 0)
    os.utime(tmp_path / "tokens.json", (now[0] + 5, now[0] + 5))  # a visible change of mtime
    with pytest.raises(auth.AuthError, match="revoked"):
        a.check(auth.fresh_credentials(0, token0, clock=lambda: now[0]), None)
    stored = (tmp_path / "tokens.json").read_text()
    assert token0.decode() not in stored  # only salted hashes are stored


def test_plaintext_only_on_loopback_with_the_flag() -> None:
    grpc_tls.refuse_plaintext("127.0.0.1:1", insecure=True)
    grpc_tls.refuse_plaintext("[::1]:1", insecure=True)
    with pytest.raises(grpc_tls.TlsConfigError, match="loopback"):
        grpc_tls.refuse_plaintext("0.0.0.0:8443", insecure=True)
    with pytest.raises(grpc_tls.TlsConfigError, match="--insecure"):
        grpc_tls.refuse_plaintext("127.0.0.1:8443", insecure=False)
