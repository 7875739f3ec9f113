"""The in-process simulator: every client in this process, one shared model, real encoding.

Requests and replies pass through the same byte encoding as on the wire, so nothing works in
simulation that would break in deployment. Clients run one after another on one model instance
re-loaded per client; no per-client process, model copy or data copy is made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from fedguard.protocol.transport import (
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    ReplyStream,
    Transport,
)
from fedguard.simulation.latency import LatencyModel, VirtualClockStream

Handler = Callable[[int, bytes], bytes]


class InProcessTransport(Transport):
    """Runs ``handler(client_id, payload)`` for each request, sequentially; asynchronous tasks
    (:meth:`stream`) run at dispatch and arrive on the virtual clock of ``latency`` (default:
    every task takes one second)."""

    supports_streams = True

    def __init__(
        self,
        handler: Handler,
        client_ids: Sequence[int],
        *,
        clock: Callable[[], float] = time.perf_counter,
        latency: LatencyModel | None = None,
    ) -> None:
        self._handler = handler
        self._client_ids = tuple(client_ids)
        self._clock = clock
        self.latency = latency if latency is not None else LatencyModel(self._client_ids)

    def stream(self, start_s: float = 0.0, deadline_s: float | None = None) -> ReplyStream:
        return VirtualClockStream(self._handler, self.latency, start_s, deadline_s)

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for client_id, payload in requests.items():
            start = self._clock()
            try:
                reply = self._handler(client_id, payload)
            except Exception as exc:  # a client's failure must never stop the round
                outcome: Outcome = Failed(
                    client_id, FailureKind.ERROR, f"{type(exc).__name__}: {exc}"
                )
            else:
                seconds = self._clock() - start
                if deadline_s is not None and seconds > deadline_s:
                    outcome = Failed(
                        client_id, FailureKind.TIMEOUT, f"replied after {seconds:.2f} s"
                    )
                else:
                    outcome = Delivered(client_id, reply, seconds)
            outcomes.append(outcome)
            self._arrived(outcome)
        return outcomes
