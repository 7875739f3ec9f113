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

No peer can take the server's threads or memory from the others. Every call is admitted before
its first message is read: at most :data:`MAX_CALLS_PER_PEER` at once per connection, at most
:data:`MAX_UNAUTHENTICATED_PER_HOST` per host and :data:`MAX_UNAUTHENTICATED` in all that have
not yet authenticated, and at most :data:`MAX_CALLS_PER_CLIENT` per authenticated client; the
worker pool is sized so that these never exhaust it. A call whose first message does not arrive
within ``first_message_s`` is cancelled. A reply is refused from its header if it is larger than
its task can need (:attr:`grpc_checks.TaskInfo.reply_limit`), a second push for a task while one
is in flight is refused at once, and a push still in flight when its task closes is cancelled.
A client's ``error`` text is quoted and cut before it is logged, so it cannot forge log lines.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError

from fedguard.protocol import messages
from fedguard.protocol.transport import (
    Arrival,
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    ReplyStream,
    Transport,
)
from fedguard.runtime import auth, grpc_checks, grpc_chunks, grpc_tls
from fedguard.runtime.proto import wire_pb2

log = logging.getLogger("fedguard.grpc")

SERVICE = "fedguard.wire.v1.Federation"
# How long a deployed task waits for its client when the driver passes no deadline. The
# deployment entry point (:func:`fedguard.experiment.deployment.serve`) always passes one, from
# ``server.deadline_s`` or ``--round-deadline`` (default 120 s); the simulator has no such
# default because its clients cannot vanish.
DEFAULT_DEADLINE_S = 120.0
# While a round waits, it logs how many of its clients have replied this often.
DEFAULT_PROGRESS_S = 10.0
DEFAULT_POLL_S = 10.0
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
# A call's first message (the one that authenticates it) must arrive within this.
DEFAULT_FIRST_MESSAGE_S = 5.0
# Calls in flight at once: per connection, unauthenticated per host and in all, per client. A
# client makes one call at a time (a Pull, then a Push); the margin covers a restarted client
# whose old Pull has not yet noticed its connection is gone.
MAX_CALLS_PER_PEER = 4
MAX_UNAUTHENTICATED_PER_HOST = 8
MAX_UNAUTHENTICATED = 16
MAX_CALLS_PER_CLIENT = 4
# HTTP/2 streams a connection may have open; calls beyond it wait on the sender's side.
MAX_STREAMS_PER_CONNECTION = 2 * MAX_CALLS_PER_PEER
# How much of a client's ``error`` text reaches the log and the round's problems.
MAX_ERROR_CHARS = 300


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
    pushing: grpc.ServicerContext | None = None  # the push in flight for this task, if any


class _GrpcStream(ReplyStream):
    """:meth:`GrpcServerTransport.stream`: tasks in the clients' mailboxes, outcomes in the order
    they settle (ties by task number); a task unanswered ``deadline_s`` after its submission
    settles as failed. The clock is wall seconds since the stream opened, plus ``start_s``."""

    def __init__(self, transport: GrpcServerTransport, start_s: float, deadline_s: float) -> None:
        if not deadline_s > 0:
            raise ValueError(f"The task deadline must be positive, got {deadline_s}.")
        self._t = transport
        self._origin = transport._clock() - start_s
        self._deadline_s = deadline_s
        self._open: dict[int, tuple[_Task, float]] = {}  # task number -> task, its end

    def now(self) -> float:
        return self._t._clock() - self._origin

    def submit(
        self, task: int, client_id: int, payload: bytes, *, sent_at: float | None = None
    ) -> float:
        if task in self._open:
            raise ValueError(f"Task {task} is already in flight.")
        with self._t._cond:
            if any(t.client_id == client_id for t, _ in self._open.values()):
                raise ValueError(f"Client {client_id} already has a task in flight.")
            opened = self._t._open(client_id, payload)
            self._open[task] = (opened, self._t._clock() + self._deadline_s)
        return self.now()

    def next(self) -> Arrival:
        t = self._t
        if not self._open:
            raise RuntimeError("No task is in flight.")
        with t._cond:
            while True:
                now = t._clock()
                done = sorted(
                    n
                    for n, (task, end) in self._open.items()
                    if task.outcome is not None or now >= end
                )
                if done:
                    number = done[0]
                    task, _ = self._open.pop(number)
                    outcome = task.outcome
                    if outcome is None:  # expired: settle it so that a late push is refused
                        outcome = task.outcome = t._missed(task, self._deadline_s)
                    pushing = t._close_task(task)
                    break
                soonest = min(end for _, end in self._open.values())
                t._cond.wait(max(0.0, min(soonest - now, 1.0)))
        if pushing is not None:  # a push for a closed task can only be refused: stop it now
            pushing.cancel()
        return Arrival(number, outcome, self.now())

    def close(self) -> None:
        t = self._t
        with t._cond:
            pushing = [t._close_task(task) for task, _ in self._open.values()]
            self._open.clear()
        for context in pushing:
            if context is not None:
                context.cancel()


class _Refused(Exception):
    """A request answered with ``code``; raised inside handlers, turned into an abort."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def quote_error(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """A client's error text as one quoted line: ``repr`` escapes newlines and other control
    characters, and the text is cut to ``limit`` characters."""
    quoted = repr(text[:limit])
    return quoted if len(text) <= limit else f"{quoted} (cut from {len(text)} characters)"


class _Watchdog:
    """Cancels calls whose deadline passed; one thread serves every call of the server."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, grpc.ServicerContext] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, context: grpc.ServicerContext, seconds: float) -> int:
        """Cancel ``context`` in ``seconds`` unless :meth:`disarm` is called with the key."""
        with self._cond:
            key = next(self._keys)
            self._armed[key] = context
            heapq.heappush(self._heap, (time.monotonic() + seconds, key))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fedguard-grpc-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return key

    def disarm(self, key: int) -> None:
        with self._cond:
            self._armed.pop(key, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            due: list[grpc.ServicerContext] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and (
                    self._heap[0][0] <= now or self._heap[0][1] not in self._armed
                ):
                    _, key = heapq.heappop(self._heap)
                    context = self._armed.pop(key, None)
                    if context is not None:
                        due.append(context)
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            for context in due:
                context.cancel()


@dataclass
class _Call:
    """One admitted call: who sent it and whether it has authenticated yet."""

    peer: str
    host: str
    client_id: int | None = None


def _decrement(counter: Counter, key: object) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _peer_common_name(context: grpc.ServicerContext) -> str | None:
    # grpc maps each auth property to a list of values (types-grpcio 1.85 says to one bytes)
    properties = cast(Mapping[str, list[bytes]], context.auth_context())
    names = properties.get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class GrpcServerTransport(Transport):
    """Serves tasks to pulling clients; see the module docstring."""

    supports_streams = True

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
        first_message_s: float = DEFAULT_FIRST_MESSAGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tls is None:
            grpc_tls.refuse_plaintext(address, insecure)
        if default_deadline_s <= 0 or progress_s <= 0 or first_message_s <= 0:
            raise ValueError(
                f"The deadline, progress interval and first-message wait must be positive, got "
                f"{default_deadline_s:g} s, {progress_s:g} s and {first_message_s:g} s."
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
        self.first_message_s = first_message_s
        self._clock = clock
        self._watchdog = _Watchdog()
        # admission: calls per connection, unauthenticated calls per host, calls per client
        self._calls_of_peer: Counter[str] = Counter()
        self._unauthenticated_of_host: Counter[str] = Counter()
        self._unauthenticated = 0
        self._calls_of_client: Counter[int] = Counter()
        self._cond = threading.Condition()
        # per client its open tasks, oldest first (more than one only when an evaluation round
        # runs while an asynchronous fit task is out: the client takes them in turn)
        self._mailbox: dict[int, list[_Task]] = {}
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
        # Admitted calls never need more threads than this; refusals take one for a moment.
        workers = MAX_CALLS_PER_CLIENT * n + MAX_UNAUTHENTICATED + 8
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedguard-grpc"),
            options=[
                *grpc_tls.SERVER_OPTIONS,
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ],
            maximum_concurrent_rpcs=2 * workers,
        )
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            # Pull is unary-stream on the wire; it is served as stream-stream so that the handler,
            # not gRPC, waits for the request (with a deadline, after admission).
            "Pull": grpc.stream_stream_rpc_method_handler(
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
        self._watchdog.stop()

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
        told: set[str] = set()  # the tasks whose outcome the watcher has seen
        with self._cond:
            for task in tasks:
                self._post(task)
            self._cond.notify_all()
            while any(t.outcome is None for t in tasks):
                self._tell_arrivals(tasks, told)
                now = self._clock()
                if now >= end:
                    break
                if now >= next_report:
                    self._report_progress(tasks, deadline, end - now)
                    next_report = now + self.progress_s
                self._cond.wait(min(end, next_report) - now)
            in_flight = []
            for task in tasks:
                if task.outcome is None:
                    task.outcome = self._missed(task, deadline)
                if task.pushing is not None:
                    in_flight.append(task.pushing)
                self._close_task(task)
            self._tell_arrivals(tasks, told)
        for context in in_flight:  # a push for a closed task can only be refused: stop it now
            context.cancel()
        return [t.outcome for t in tasks if t.outcome is not None]

    def _tell_arrivals(self, tasks: Sequence[_Task], told: set[str]) -> None:
        """Pass the outcomes settled since the last call to the watcher (under the lock; the
        watcher returns quickly, see :meth:`Transport.watch`)."""
        for task in tasks:
            if task.outcome is not None and task.task_id not in told:
                told.add(task.task_id)
                self._arrived(task.outcome)

    def stream(self, start_s: float = 0.0, deadline_s: float | None = None) -> ReplyStream:
        """Asynchronous dispatch over the same mailboxes: each submitted task waits for its
        client like an exchange's, up to ``deadline_s`` (default ``default_deadline_s``) from
        its submission, and outcomes come back as they settle."""
        deadline = self.default_deadline_s if deadline_s is None else deadline_s
        return _GrpcStream(self, start_s, deadline)

    def _open(self, client_id: int, payload: bytes) -> _Task:
        """Put a task in ``client_id``'s mailbox (under the lock)."""
        info = grpc_checks.describe_task(payload)
        task_id = secrets.token_hex(8)
        task = _Task(task_id, client_id, payload, grpc_chunks.header_of(task_id, payload), info)
        self._post(task)
        self._cond.notify_all()
        return task

    def _post(self, task: _Task) -> None:
        """Open ``task``: behind its client's other open tasks (under the lock)."""
        self._mailbox.setdefault(task.client_id, []).append(task)
        self._tasks[task.task_id] = task

    def _close_task(self, task: _Task) -> grpc.ServicerContext | None:
        """Take a finished or abandoned task out of the mailboxes (under the lock); returns the
        push still in flight for it, which the caller cancels outside the lock."""
        self._tasks.pop(task.task_id, None)
        queue = [t for t in self._mailbox.get(task.client_id, []) if t is not task]
        if queue:
            self._mailbox[task.client_id] = queue
        else:
            self._mailbox.pop(task.client_id, None)
        return task.pushing

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
    def _admit(self, context: grpc.ServicerContext) -> _Call:
        """Count a new call against its connection's and host's limits, or refuse it."""
        peer = context.peer()
        call = _Call(peer, _host(peer))
        with self._cond:
            if self._calls_of_peer[call.peer] >= MAX_CALLS_PER_PEER:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_CALLS_PER_PEER} calls at once on one connection",
                )
            if (
                self._unauthenticated >= MAX_UNAUTHENTICATED
                or self._unauthenticated_of_host[call.host] >= MAX_UNAUTHENTICATED_PER_HOST
            ):
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many unauthenticated calls at once"
                )
            self._calls_of_peer[call.peer] += 1
            self._unauthenticated_of_host[call.host] += 1
            self._unauthenticated += 1
        return call

    def _admit_client(self, call: _Call, client_id: int) -> None:
        """Move an authenticated call from its host's count to its client's, or refuse it."""
        with self._cond:
            self._unauthenticated_of_host[call.host] -= 1
            self._unauthenticated -= 1
            call.client_id = client_id
            self._calls_of_client[client_id] += 1
            if self._calls_of_client[client_id] > MAX_CALLS_PER_CLIENT:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client {client_id} has more than {MAX_CALLS_PER_CLIENT} calls at once",
                )

    def _release(self, call: _Call) -> None:
        with self._cond:
            _decrement(self._calls_of_peer, call.peer)
            if call.client_id is None:
                _decrement(self._unauthenticated_of_host, call.host)
                self._unauthenticated -= 1
            else:
                _decrement(self._calls_of_client, call.client_id)

    def _first(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        """A call's first message, or None if the stream ended (or was cancelled: the peer
        sent nothing within ``first_message_s``)."""
        key = self._watchdog.arm(context, self.first_message_s)
        try:
            return next(requests, None)
        except grpc.RpcError:  # cancelled by the watchdog or by the peer
            return None
        finally:
            self._watchdog.disarm(key)

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
        log.warning(
            "%s from %s refused (%s): %s",
            method,
            context.peer(),
            exc.code.name,
            messages.printable(str(exc)),
        )
        # The sender learns the status only; the reason stays in the server's log.
        public = (
            "authentication failed" if exc.code is grpc.StatusCode.UNAUTHENTICATED else str(exc)
        )
        context.abort(exc.code, public)
        raise AssertionError("grpc's context.abort always raises")

    def _pull(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[wire_pb2.TaskChunk]:
        try:
            call = self._admit(context)
        except _Refused as exc:
            self._refuse(context, "Pull", exc)
        try:
            try:
                raw = self._first(requests, context)
                if raw is None:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "no PullRequest")
                try:
                    request = wire_pb2.PullRequest.FromString(raw)
                except DecodeError:
                    raise _Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, "malformed PullRequest"
                    ) from None
                client_id = self._authenticate(request.credentials, context)
                self._admit_client(call, client_id)
            except _Refused as exc:
                self._refuse(context, "Pull", exc)
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
        finally:
            self._release(call)

    def _next_task(
        self, client_id: int, context: grpc.ServicerContext
    ) -> _Task | wire_pb2.PullStatus:
        """The client's open task, waiting up to ``poll_s``; else ``PULL_STATUS_IDLE`` or
        ``PULL_STATUS_FINISHED`` when the run is over."""
        end = self._clock() + self.poll_s
        with self._cond:
            while True:
                if self._finished:
                    self._told_finished.add(client_id)
                    self._cond.notify_all()
                    return wire_pb2.PULL_STATUS_FINISHED
                task = next(
                    (t for t in self._mailbox.get(client_id, []) if t.outcome is None), None
                )
                if task is not None:
                    if task.sent_at is None:
                        task.sent_at = self._clock()
                    return task
                left = end - self._clock()
                if left <= 0 or not context.is_active():
                    return wire_pb2.PULL_STATUS_IDLE
                self._cond.wait(min(left, 1.0))

    def _push(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> wire_pb2.PushAck:
        try:
            call = self._admit(context)
        except _Refused as exc:
            self._refuse(context, "Push", exc)
        try:
            return self._receive(chunks, context, call)
        except _Refused as exc:
            self._refuse(context, "Push", exc)
        finally:
            self._release(call)

    @staticmethod
    def _chunk(raw: bytes | None) -> wire_pb2.ReplyChunk:
        if raw is None:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty reply stream")
        try:
            return wire_pb2.ReplyChunk.FromString(raw)
        except DecodeError:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed ReplyChunk") from None

    def _receive(
        self, chunks: Iterator[bytes], context: grpc.ServicerContext, call: _Call
    ) -> wire_pb2.PushAck:
        first = self._chunk(self._first(chunks, context))
        client_id = self._authenticate(first.credentials, context)
        self._admit_client(call, client_id)
        task_id = first.header.task_id
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None or task.client_id != client_id or task.outcome is not None:
                raise _Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {task_id!r} is not an open task of client {client_id}",
                )
            if task.pushing is not None:
                raise _Refused(
                    grpc.StatusCode.ABORTED, f"a reply to task {task_id!r} is already in flight"
                )
            task.pushing = context
        try:
            return self._settle_push(task, first, chunks)
        finally:
            with self._cond:
                if task.pushing is context:
                    task.pushing = None

    def _settle_push(
        self, task: _Task, first: wire_pb2.ReplyChunk, chunks: Iterator[bytes]
    ) -> wire_pb2.PushAck:
        client_id, task_id = task.client_id, task.task_id
        if first.error:
            reason = f"the client reported an error: {quote_error(first.error)}"
            self._settle(task, Failed(client_id, FailureKind.ERROR, reason))
            return wire_pb2.PushAck(task_id=task_id)
        try:
            payload = self._assemble(first, chunks, task.info.reply_limit)
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

    def _assemble(
        self, first: wire_pb2.ReplyChunk, chunks: Iterator[bytes], reply_limit: int
    ) -> bytes:
        """The reply's payload; refused from its header if it announces more than the task's
        ``reply_limit`` (or the server's ``max_payload_bytes``), before any data is buffered."""
        h = first.header
        assembler = grpc_chunks.Assembler(
            grpc_chunks.Header(h.task_id, h.size, h.sha256),
            max_bytes=min(self.max_payload_bytes, reply_limit),
        )
        assembler.add(first.data)
        try:
            for raw in chunks:
                chunk = self._chunk(raw)
                if chunk.HasField("credentials") or chunk.HasField("header") or chunk.error:
                    raise _Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "only the first chunk may carry credentials, a header or an error",
                    )
                assembler.add(chunk.data)
        except grpc.RpcError:  # cancelled: its task closed, or the sender went away
            raise _Refused(grpc.StatusCode.CANCELLED, "the reply stream was cancelled") from None
        return assembler.finish()

    def _note_problem(self, task: _Task, problem: str) -> None:
        with self._cond:
            task.last_problem = messages.printable(problem)

    def _settle(self, task: _Task, outcome: Outcome) -> bool:
        """Record the task's outcome unless it already has one (expired); wake ``exchange``."""
        with self._cond:
            if task.outcome is not None:
                return False
            task.outcome = outcome
            self._cond.notify_all()
            return True
