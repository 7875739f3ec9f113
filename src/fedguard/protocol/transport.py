"""The seam between the round driver and where clients run.

A transport sends encoded messages to clients and returns what comes back before the deadline.
The in-process simulator, Ray and gRPC implement it; the round driver is written once against it.

A live view wants each outcome as it arrives, not the whole list at the end of an exchange:
:meth:`Transport.watch` installs a callback that a transport able to tell calls with every
outcome as it settles (the in-process simulator after each client, Ray as each result comes
back, gRPC as each reply lands). A transport that cannot tell calls nothing; the exchange's
return value stays the one authority on a round's outcomes.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


class FailureKind(enum.StrEnum):
    ERROR = "error"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Delivered:
    """A client's reply payload and the seconds it took."""

    client_id: int
    payload: bytes
    seconds: float


@dataclass(frozen=True)
class Failed:
    """A client that did not reply in time or raised; ``reason`` is for the log."""

    client_id: int
    kind: FailureKind
    reason: str


Outcome = Delivered | Failed


@dataclass(frozen=True)
class Arrival:
    """What became of asynchronous task ``task``, and when (on its stream's clock, seconds)."""

    task: int
    outcome: Outcome
    at: float


class ReplyStream(abc.ABC):
    """Asynchronous dispatch: tasks go out one at a time and their outcomes come back in the
    order they arrive (FedBuff's server, :mod:`fedguard.protocol.async_driver`).

    The clock is the stream's own: virtual seconds in a simulation with a latency model, wall
    seconds since the stream opened in a deployment.
    """

    @abc.abstractmethod
    def submit(
        self, task: int, client_id: int, payload: bytes, *, sent_at: float | None = None
    ) -> float:
        """Send ``payload`` to ``client_id`` as task ``task`` (unique per stream); returns the
        time it counts as sent. ``sent_at`` (a resumed run re-sending its in-flight tasks) is
        the time it was first sent; a simulation keeps it, a deployment sends now."""

    @abc.abstractmethod
    def next(self) -> Arrival:
        """Wait for the next outcome of a submitted task (a reply or a failure)."""

    @abc.abstractmethod
    def now(self) -> float:
        """The stream's clock."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop waiting for the tasks still out."""


class AsyncUnsupportedError(RuntimeError):
    """A transport that cannot dispatch tasks one at a time (``server.mode = "async"``)."""


OutcomeWatcher = Callable[[Outcome], None]


class Transport(abc.ABC):
    """Deliver one request per client and gather the outcomes; a transport that can also
    dispatch one task at a time implements :meth:`stream`."""

    supports_streams: bool = False
    _watcher: OutcomeWatcher | None = None

    def watch(self, watcher: OutcomeWatcher | None) -> None:
        """Call ``watcher`` with each outcome of the following exchanges as it arrives (None:
        stop). It may be called from the transport's own threads and must return quickly.
        A wrapper around another transport passes it on (and reports the outcomes it makes up
        itself)."""
        self._watcher = watcher

    def _arrived(self, outcome: Outcome) -> None:
        """Tell the watcher, if any, that ``outcome`` arrived; a watcher's failure is not the
        exchange's, so it is swallowed."""
        watcher = self._watcher
        if watcher is None:
            return
        try:
            watcher(outcome)
        except Exception:  # noqa: BLE001 - a live view must never break a round
            logging.getLogger("fedguard.transport").exception("an outcome watcher failed")

    @property
    @abc.abstractmethod
    def client_ids(self) -> Sequence[int]:
        """The clients this transport can reach."""

    @abc.abstractmethod
    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        """Send ``requests`` (client id to payload); return one outcome per request, in order."""

    def stream(self, start_s: float = 0.0, deadline_s: float | None = None) -> ReplyStream:
        """A :class:`ReplyStream` over these clients, its clock starting at ``start_s``; a task
        unanswered ``deadline_s`` after it was sent arrives as a timeout (None: the
        transport's default, which may be no deadline)."""
        raise AsyncUnsupportedError(
            f"{type(self).__name__} cannot dispatch tasks one at a time, which "
            'server.mode = "async" needs'
        )

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release connections or workers."""


class Population(Transport):
    """``transport`` restricted to the clients ``client_ids`` (the registered ones): the round
    driver samples from them; requests pass through unchanged."""

    def __init__(self, transport: Transport, client_ids: Sequence[int]) -> None:
        unknown = sorted(set(client_ids) - set(transport.client_ids))
        if unknown:
            raise ValueError(f"Clients {unknown} are not reachable over this transport.")
        self.inner = transport
        self._client_ids = tuple(client_ids)
        self.supports_streams = transport.supports_streams

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        return self.inner.exchange(requests, deadline_s=deadline_s)

    def watch(self, watcher: OutcomeWatcher | None) -> None:
        super().watch(watcher)
        self.inner.watch(watcher)

    def stream(self, start_s: float = 0.0, deadline_s: float | None = None) -> ReplyStream:
        return self.inner.stream(start_s, deadline_s)

    def close(self) -> None:
        self.inner.close()
