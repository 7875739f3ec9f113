"""The deployment server: a :class:`Transport` whose clients pull their tasks over gRPC.

The round driver calls :meth:`GrpcServerTransport.exchange` exactly as it calls the simulator's;
only where the bytes go differs. Each request becomes an open *task* in its client's mailbox.
Clients connect out to the server (a hospital opens no inbound port): a client's ``Pull`` waits
up to ``poll_s`` for its task and streams it in chunks; its ``Push`` streams the reply back.
``exchange`` returns when every task is answered or at the deadline, when the unanswered ones
become :class:`Failed` outcomes (the driver then drops those clients from the round).

Every request is authenticated (:mod:`fedguard.runtime.auth`) before anything is read or sent:
a refused one gets ``UNAUTHENTICATED`` and a log line, and learns nothing of the model or the
round. Protobuf is parsed by the handlers themselves, so malformed bytes get
``INVALID_ARGUMENT`` rather than a server-side exception. A reply that fails the checks of
:mod:`fedguard.runtime.grpc_checks` or of :mod:`fedguard.runtime.grpc_chunks` is refused with a
status and logged; its task stays open until a good reply or the deadline, and the round goes on.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from fedguard.protocol.transport import Delivered, Failed, FailureKind, Outcome, Transport
from fedguard.runtime import auth, grpc_checks, grpc_chunks, grpc_tls
from fedguard.runtime.proto import wire_pb2

log = logging.getLogger("fedguard.grpc")

SERVICE = "fedguard.wire.v1.Federation"
# How long a deployed task waits for its client when the driver passes no deadline. The
# deployment entry point (:func:`fedguard.runtime.grpc_deploy.serve`) always passes one, from
# ``server.deadline_s`` or ``--round-deadline`` (default 120 s); the simulator has no such
# default because its clients cannot vanish.
DEFAULT_DEADLINE_S = 120.0
# While a round waits, it logs how many of its clients have replied this often.
DEFAULT_PROGRESS_S = 10.0
DEFAULT_POLL_S = 10.0
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30


@dataclass
class _Task:
    """One request to one client and what became of it; mutated under the transport's lock."""

    task_id: str
    client_id: int
    payload: bytes
    header: grpc_chunks.Header
    info: grpc_checks.TaskInfo
    sent_at: float | None = None
    outcome: Outcome | None = None
    last_problem: str | None = None


class _Refused(Exception):
    """A request answered with ``code``; raised inside handlers, turned into an abort."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _peer_common_name(context: grpc.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class GrpcServerTransport(Transport):
    """Serves tasks to pulling clients; see the module docstring."""

    def __init__(
        self,
        client_ids: Sequence[int],
        address: str,
        *,
        authenticator: auth.Authenticator,
        tls: grpc_tls.ServerTls | None,
        insecure: bool = False,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        poll_s: float = DEFAULT_POLL_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        progress_s: float = DEFAULT_PROGRESS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tls is None:
            grpc_tls.refuse_plaintext(address, insecure)
        if default_deadline_s <= 0 or progress_s <= 0:
            raise ValueError(
                f"The deadline and progress interval must be positive, got "
                f"{default_deadline_s:g} s and {progress_s:g} s."
            )
        self._client_ids = tuple(client_ids)
        self._known = frozenset(self._client_ids)
        self._address = address
        self._auth = authenticator
        self._tls = tls
        self.default_deadline_s = default_deadline_s
        self.poll_s = poll_s
        self.max_payload_bytes = max_payload_bytes
        self.progress_s = progress_s
        self._clock = clock
        self._cond = threading.Condition()
        self._mailbox: dict[int, _Task] = {}
        self._tasks: dict[str, _Task] = {}
        self._seen: set[int] = set()
        self._told_finished: set[int] = set()
        self._finished = False
        self._server: grpc.Server | None = None
        self.port: int | None = None

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        n = len(self._client_ids)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2 * n + 16, thread_name_prefix="fedguard-grpc"),
            options=grpc_tls.SERVER_OPTIONS,
            maximum_concurrent_rpcs=4 * n + 64,
        )
        handlers = {
            "Pull": grpc.unary_stream_rpc_method_handler(
                self._pull, response_serializer=wire_pb2.TaskChunk.SerializeToString
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self._push, response_serializer=wire_pb2.PushAck.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if self._tls is None:
            port = server.add_insecure_port(self._address)
        else:
            port = server.add_secure_port(self._address, self._tls.credentials())
        if port == 0:
            raise OSError(f"Cannot listen on {self._address}.")
        server.start()
        self._server, self.port = server, port
        log.info(
            "serving %d clients on port %d (%s)", n, port, "TLS" if self._tls else "plain text"
        )
        return port

    def connected(self) -> set[int]:
        """The clients that have authenticated at least once since :meth:`start`."""
        with self._cond:
            return set(self._seen)

    def wait_for_clients(self, count: int, timeout_s: float) -> bool:
        """Block until ``count`` distinct clients have connected, or ``timeout_s`` passed."""
        end = self._clock() + timeout_s
        with self._cond:
            while len(self._seen) < count:
                left = end - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def finish(self, grace_s: float = 3.0) -> None:
        """Tell pulling clients the run is over (they exit), then stop the server."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            end = self._clock() + grace_s
            while not self._seen <= self._told_finished and self._clock() < end:
                self._cond.wait(0.1)
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None

    # -- the Transport interface ----------------------------------------------------------------
    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        deadline = self.default_deadline_s if deadline_s is None else deadline_s
        tasks: list[_Task] = []
        for client_id, payload in requests.items():
            info = grpc_checks.describe_task(payload)
            task_id = secrets.token_hex(8)
            tasks.append(
                _Task(task_id, client_id, payload, grpc_chunks.header_of(task_id, payload), info)
            )
        start = self._clock()
        end, next_report = start + deadline, start + self.progress_s
        with self._cond:
            for task in tasks:
                self._mailbox[task.client_id] = task
                self._tasks[task.task_id] = task
            self._cond.notify_all()
            while any(t.outcome is None for t in tasks):
                now = self._clock()
                if now >= end:
                    break
                if now >= next_report:
                    self._report_progress(tasks, deadline, end - now)
                    next_report = now + self.progress_s
                self._cond.wait(min(end, next_report) - now)
            for task in tasks:
                if task.outcome is None:
                    task.outcome = self._missed(task, deadline)
                self._tasks.pop(task.task_id, None)
                if self._mailbox.get(task.client_id) is task:
                    del self._mailbox[task.client_id]
        return [t.outcome for t in tasks if t.outcome is not None]

    @staticmethod
    def _report_progress(tasks: Sequence[_Task], deadline: float, left: float) -> None:
        """Log how many of a waiting exchange's clients have replied (called under the lock)."""
        replied = sum(t.outcome is not None for t in tasks)
        fetched = sum(t.sent_at is not None for t in tasks)
        info = tasks[0].info
        log.info(
            "round %d, %s: %d of %d clients replied, %d fetched their task; "
            "%.0f s of the %g s deadline left",
            info.round,
            info.kind.__name__,
            replied,
            len(tasks),
            fetched,
            left,
            deadline,
        )

    @staticmethod
    def _missed(task: _Task, deadline: float) -> Failed:
        if task.last_problem is not None:
            return Failed(task.client_id, FailureKind.ERROR, f"rejected: {task.last_problem}")
        if task.sent_at is None:
            return Failed(
                task.client_id,
                FailureKind.UNREACHABLE,
                f"did not fetch its task within the {deadline:g} s deadline",
            )
        return Failed(task.client_id, FailureKind.TIMEOUT, f"no reply within {deadline:g} s")

    # -- handlers ---------------------------------------------------------------------------
    def _authenticate(self, creds: wire_pb2.Credentials, context: grpc.ServicerContext) -> int:
        claimed = auth.Credentials(creds.client_id, creds.token, creds.timestamp_ms, creds.nonce)
        try:
            if claimed.client_id not in self._known:
                raise auth.AuthError(f"client {claimed.client_id} is not in this federation")
            self._auth.check(claimed, _peer_common_name(context))
        except auth.AuthError as exc:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {exc}"
            ) from None
        with self._cond:
            if claimed.client_id not in self._seen:
                self._seen.add(claimed.client_id)
                self._cond.notify_all()
        return claimed.client_id

    @staticmethod
    def _refuse(context: grpc.ServicerContext, method: str, exc: _Refused) -> NoReturn:
        log.warning("%s from %s refused (%s): %s", method, context.peer(), exc.code.name, exc)
        # The sender learns the status only; the reason stays in the server's log.
        public = (
            "authentication failed" if exc.code is grpc.StatusCode.UNAUTHENTICATED else str(exc)
        )
        context.abort(exc.code, public)
        raise AssertionError("grpc's context.abort always raises")

    def _pull(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[wire_pb2.TaskChunk]:
        try:
            try:
                request = wire_pb2.PullRequest.FromString(raw)
            except DecodeError:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed PullRequest") from None
            client_id = self._authenticate(request.credentials, context)
        except _Refused as exc:
            self._refuse(context, "Pull", exc)
            return
        task = self._next_task(client_id, context)
        if not isinstance(task, _Task):
            yield wire_pb2.TaskChunk(status=task)
            return
        h = task.header
        header = wire_pb2.PayloadHeader(task_id=h.task_id, size=h.size, sha256=h.sha256)
        for i, piece in enumerate(grpc_chunks.pieces(task.payload)):
            if i == 0:
                yield wire_pb2.TaskChunk(
                    status=wire_pb2.PULL_STATUS_TASK, header=header, data=bytes(piece)
                )
            else:
                yield wire_pb2.TaskChunk(data=bytes(piece))

    def _next_task(self, client_id: int, context: grpc.ServicerContext) -> _Task | int:
        """The client's open task, waiting up to ``poll_s``; else ``PULL_STATUS_IDLE`` or
        ``PULL_STATUS_FINISHED`` when the run is over."""
        end = self._clock() + self.poll_s
        with self._cond:
            while True:
                if self._finished:
                    self._told_finished.add(client_id)
                    self._cond.notify_all()
                    return wire_pb2.PULL_STATUS_FINISHED
                task = self._mailbox.get(client_id)
                if task is not None and task.outcome is None:
                    if task.sent_at is None:
                        task.sent_at = self._clock()
                    return task
                left = end - self._clock()
                if left <= 0 or not context.is_active():
                    return wire_pb2.PULL_STATUS_IDLE
                self._cond.wait(min(left, 1.0))

    def _push(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> wire_pb2.PushAck:
        try:
            return self._receive(chunks, context)
        except _Refused as exc:
            self._refuse(context, "Push", exc)

    @staticmethod
    def _chunk(raw: bytes | None) -> wire_pb2.ReplyChunk:
        if raw is None:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty reply stream")
        try:
            return wire_pb2.ReplyChunk.FromString(raw)
        except DecodeError:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed ReplyChunk") from None

    def _receive(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> wire_pb2.PushAck:
        first = self._chunk(next(chunks, None))
        client_id = self._authenticate(first.credentials, context)
        task_id = first.header.task_id
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None or task.client_id != client_id or task.outcome is not None:
                raise _Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {task_id!r} is not an open task of client {client_id}",
                )
        if first.error:
            self._settle(task, Failed(client_id, FailureKind.ERROR, first.error[:1000]))
            return wire_pb2.PushAck(task_id=task_id)
        try:
            payload = self._assemble(first, chunks)
            problem = grpc_checks.reply_problem(task.info, payload)
            if problem is not None:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        except grpc_chunks.WireError as exc:
            self._note_problem(task, str(exc))
            raise _Refused(exc.code, str(exc)) from None
        except _Refused as exc:
            self._note_problem(task, str(exc))
            raise
        seconds = self._clock() - (task.sent_at or self._clock())
        if not self._settle(task, Delivered(client_id, payload, seconds)):
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {task_id!r} expired")
        return wire_pb2.PushAck(task_id=task_id)

    def _assemble(self, first: wire_pb2.ReplyChunk, chunks: Iterator[bytes]) -> bytes:
        h = first.header
        assembler = grpc_chunks.Assembler(
            grpc_chunks.Header(h.task_id, h.size, h.sha256), max_bytes=self.max_payload_bytes
        )
        assembler.add(first.data)
        for raw in chunks:
            chunk = self._chunk(raw)
            if chunk.HasField("credentials") or chunk.HasField("header") or chunk.error:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "only the first chunk may carry credentials, a header or an error",
                )
            assembler.add(chunk.data)
        return assembler.finish()

    def _note_problem(self, task: _Task, problem: str) -> None:
        with self._cond:
            task.last_problem = problem

    def _settle(self, task: _Task, outcome: Outcome) -> bool:
        """Record the task's outcome unless it already has one (expired); wake ``exchange``."""
        with self._cond:
            if task.outcome is not None:
                return False
            task.outcome = outcome
            self._cond.notify_all()
            return True
