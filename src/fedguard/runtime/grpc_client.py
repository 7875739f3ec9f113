"""A deployed client: pull a task, answer it with the client function, push the reply, repeat.

The client connects out to the server, so it needs no inbound port. It is the same
``ClientApp.handle`` that serves the simulator, bound to one client id and its local data. When
the server is unreachable (restarting after a crash, a network cut) the client retries with
exponential backoff and full jitter, and joins whichever round the server runs next; a refused
credential (``UNAUTHENTICATED``) stops it at once, since retrying cannot help.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from fedguard.runtime import auth, grpc_chunks, grpc_tls
from fedguard.runtime.proto import wire_pb2, wire_pb2_grpc

log = logging.getLogger("fedguard.grpc.client")

Handler = Callable[[int, bytes], bytes]
MAX_TASK_BYTES = 4 << 30
MAX_ERROR_CHARS = 1000  # of an exception's text sent to the server (which quotes and cuts it)
_RETRY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class ClientRefusedError(RuntimeError):
    """The server refused this client's credentials."""


class ServerGoneError(RuntimeError):
    """The server stayed unreachable for longer than the client is willing to wait."""


@dataclass(frozen=True)
class ClientSettings:
    """Where the server is, who this client is, and how patiently it reconnects."""

    address: str
    client_id: int
    token: bytes
    tls: grpc_tls.ClientTls | None
    insecure: bool = False
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    give_up_after_s: float = 600.0


class Backoff:
    """Exponential backoff with full jitter (sleep a uniform time up to the current cap)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self.initial_s, self.max_s, self._rng = initial_s, max_s, rng
        self._cap = initial_s

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self._cap)
        self._cap = min(self.max_s, self._cap * 2.0)
        return delay

    def reset(self) -> None:
        self._cap = self.initial_s


def _credentials(settings: ClientSettings) -> wire_pb2.Credentials:
    c = auth.fresh_credentials(settings.client_id, settings.token)
    return wire_pb2.Credentials(
        client_id=c.client_id, token=c.token, timestamp_ms=c.timestamp_ms, nonce=c.nonce
    )


def _reply_chunks(
    settings: ClientSettings, task_id: str, payload: bytes, error: str
) -> Iterator[wire_pb2.ReplyChunk]:
    h = grpc_chunks.header_of(task_id, payload)
    header = wire_pb2.PayloadHeader(task_id=task_id, size=h.size, sha256=h.sha256)
    for i, piece in enumerate(grpc_chunks.pieces(payload)):
        if i == 0:
            yield wire_pb2.ReplyChunk(
                credentials=_credentials(settings), header=header, data=bytes(piece), error=error
            )
        else:
            yield wire_pb2.ReplyChunk(data=bytes(piece))


def _pull(
    stub: wire_pb2_grpc.FederationStub, settings: ClientSettings
) -> tuple[int, str, bytes | None, str]:
    """One ``Pull``: (status, task id, payload, problem with the payload or "")."""
    stream = stub.Pull(wire_pb2.PullRequest(credentials=_credentials(settings)))
    assembler: grpc_chunks.Assembler | None = None
    status, task_id = wire_pb2.PULL_STATUS_UNSPECIFIED, ""
    try:
        for chunk in stream:
            if assembler is None:  # the first chunk
                status = chunk.status
                if status != wire_pb2.PULL_STATUS_TASK:
                    return status, "", None, ""
                h = chunk.header
                task_id = h.task_id
                assembler = grpc_chunks.Assembler(
                    grpc_chunks.Header(h.task_id, h.size, h.sha256), max_bytes=MAX_TASK_BYTES
                )
            assembler.add(chunk.data)
        if assembler is None:
            return wire_pb2.PULL_STATUS_IDLE, "", None, ""
        return status, task_id, assembler.finish(), ""
    except grpc_chunks.WireError as exc:
        return status, task_id, None, f"the task payload was refused: {exc}"


def serve(
    settings: ClientSettings,
    handler: Handler,
    *,
    stop: threading.Event | None = None,
    rng: random.Random | None = None,
    stop_on: tuple[type[Exception], ...] = (),
) -> int:
    """Answer tasks until the server says the run is finished; returns the tasks answered.

    Raises :class:`ClientRefusedError` on ``UNAUTHENTICATED`` and :class:`ServerGoneError` when
    the server is unreachable for ``give_up_after_s``. A handler exception of a ``stop_on``
    type (one that retrying cannot cure) is reported to the server like any other, then raised.
    """
    stop = stop or threading.Event()
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng or random.Random())
    answered = 0
    down_since: float | None = None
    channel = grpc_tls.channel(settings.address, settings.tls, insecure=settings.insecure)
    stub = wire_pb2_grpc.FederationStub(channel)
    try:
        while not stop.is_set():
            try:
                status, task_id, payload, problem = _pull(stub, settings)
                down_since = None
                backoff.reset()
                if status == wire_pb2.PULL_STATUS_FINISHED:
                    log.info("client %d: the run is finished", settings.client_id)
                    return answered
                if status != wire_pb2.PULL_STATUS_TASK:
                    continue
                reply, error = b"", problem
                fatal: Exception | None = None
                if payload is not None:
                    try:
                        reply = handler(settings.client_id, payload)
                    except Exception as exc:  # reported to the server, which fails the task
                        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                        # quoted: an exception's text may hold newlines that would forge lines
                        log.warning("client %d: task failed: %r", settings.client_id, error)
                        fatal = exc if isinstance(exc, stop_on) else None
                stub.Push(_reply_chunks(settings, task_id, reply, error))
                answered += 1
                if fatal is not None:
                    raise fatal
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    raise ClientRefusedError(
                        f"The server refused client {settings.client_id}'s credentials."
                    ) from None
                if code not in _RETRY:
                    log.warning("client %d: %s: %s", settings.client_id, code.name, exc.details())
                    continue
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since > settings.give_up_after_s:
                    raise ServerGoneError(
                        f"The server at {settings.address} was unreachable for "
                        f"{settings.give_up_after_s:g} s."
                    ) from None
                delay = backoff.next_delay()
                log.info("client %d: %s, retrying in %.2f s", settings.client_id, code.name, delay)
                stop.wait(delay)
        return answered
    finally:
        channel.close()
