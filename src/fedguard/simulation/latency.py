"""Simulated client latency and the virtual clock of an asynchronous simulation.

A :class:`LatencyModel` gives every (client, task) a seeded duration: a base draw (constant,
exponential or log-normal with mean ``mean_s``) times ``slowdown`` for the clients drawn slow
(``slow_fraction`` of them, a seeded choice fixed for the run). The same model times a
synchronous round (it lasts as long as its slowest client: :meth:`LatencyModel.round_seconds`)
and an asynchronous run (:class:`VirtualClockStream`), so the two compare like with like.

:class:`VirtualClockStream` is an event simulation. A client's reply depends only on the task it
received (the model version, its seed), so the client runs at dispatch, in this process, and
its outcome is queued to arrive at ``sent + latency`` on a virtual clock; :meth:`next` delivers
outcomes in virtual-time order (ties by task number). The real time spent training is not the
simulated time: the clock is what a deployment with these latencies would have taken.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedguard.protocol.transport import (
    Arrival,
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    ReplyStream,
)

LATENCY_STREAM = 0x1A7  # the seeding stream of the task durations
SLOW_STREAM = 0x510  # the seeding stream of the choice of slow clients


class Base(enum.StrEnum):
    """The distribution of a task's duration before the slowdown."""

    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    LOGNORMAL = "lognormal"


@dataclass(frozen=True)
class LatencyModel:
    """Seeded task durations for ``client_ids`` (see the module docstring).

    ``sigma`` is the log-normal's shape (the standard deviation of the log); its location is
    chosen so that the mean is ``mean_s``.
    """

    client_ids: tuple[int, ...]
    base: Base = Base.CONSTANT
    mean_s: float = 1.0
    sigma: float = 0.5
    slow_fraction: float = 0.0
    slowdown: float = 10.0
    seed: int = 0
    slow: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        if not (self.mean_s > 0 and math.isfinite(self.mean_s)):
            raise ValueError(f"The mean latency must be positive, got {self.mean_s}.")
        if not 0 <= self.slow_fraction <= 1:
            raise ValueError(f"The slow fraction must be in [0, 1], got {self.slow_fraction}.")
        if not self.slowdown >= 1:
            raise ValueError(f"The slowdown must be at least 1, got {self.slowdown}.")
        if not self.sigma >= 0:
            raise ValueError(f"The log-normal sigma must be non-negative, got {self.sigma}.")
        ids = sorted(self.client_ids)
        count = round(self.slow_fraction * len(ids))
        rng = np.random.default_rng([self.seed, SLOW_STREAM])
        picked = rng.permutation(len(ids))[:count]
        object.__setattr__(self, "slow", frozenset(ids[int(i)] for i in picked))

    def seconds(self, client_id: int, key: int) -> float:
        """The duration of client ``client_id``'s task ``key`` (a round, or an async task
        number), the same on every call."""
        rng = np.random.default_rng([self.seed, client_id, key, LATENCY_STREAM])
        if self.base is Base.CONSTANT:
            t = self.mean_s
        elif self.base is Base.EXPONENTIAL:
            t = float(rng.exponential(self.mean_s))
        else:
            mu = math.log(self.mean_s) - 0.5 * self.sigma**2
            t = float(rng.lognormal(mu, self.sigma))
        return t * (self.slowdown if client_id in self.slow else 1.0)

    def round_seconds(self, round_: int, client_ids: Iterable[int]) -> float:
        """How long a synchronous round of ``client_ids`` lasts: its slowest client's task."""
        return max((self.seconds(c, round_) for c in client_ids), default=0.0)


Handler = Callable[[int, bytes], bytes]


class VirtualClockStream(ReplyStream):
    """Runs each task at dispatch and delivers its outcome in virtual-time order; a task whose
    latency exceeds ``deadline_s`` arrives as a timeout at ``sent + deadline_s``."""

    def __init__(
        self,
        handler: Handler,
        latency: LatencyModel,
        start_s: float = 0.0,
        deadline_s: float | None = None,
    ) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"The task deadline must be positive, got {deadline_s}.")
        self._handler = handler
        self._latency = latency
        self._deadline_s = deadline_s
        self._now = start_s
        self._queue: list[tuple[float, int, Outcome]] = []

    def submit(
        self, task: int, client_id: int, payload: bytes, *, sent_at: float | None = None
    ) -> float:
        sent = self._now if sent_at is None else sent_at
        seconds = self._latency.seconds(client_id, task)
        outcome: Outcome
        if self._deadline_s is not None and seconds > self._deadline_s:
            reason = f"no reply within {self._deadline_s:g} s (it takes {seconds:.3g} s)"
            outcome = Failed(client_id, FailureKind.TIMEOUT, reason)
            heapq.heappush(self._queue, (sent + self._deadline_s, task, outcome))
            return sent
        try:
            outcome = Delivered(client_id, self._handler(client_id, payload), seconds)
        except Exception as exc:  # a client's failure must never stop the run
            outcome = Failed(client_id, FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
        heapq.heappush(self._queue, (sent + seconds, task, outcome))
        return sent

    def next(self) -> Arrival:
        if not self._queue:
            raise RuntimeError("No task is in flight.")
        at, task, outcome = heapq.heappop(self._queue)
        self._now = max(self._now, at)
        return Arrival(task, outcome, at)

    def now(self) -> float:
        return self._now

    @property
    def in_flight(self) -> Sequence[int]:
        """The numbers of the tasks not yet delivered, in arrival order."""
        return [task for _, task, _ in sorted(self._queue, key=lambda e: (e[0], e[1]))]
