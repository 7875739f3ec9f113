"""Transport wrappers that make chosen clients fail at chosen points of a round.

Real deployments lose clients mid-round (a phone goes offline after sending its shares); these
wrappers reproduce that on top of any transport, so tests and benchmarks can check what a round
and the clients' state make of it.

:class:`PhaseDropout` drops clients at chosen secure-aggregation phases, so that a round can be
seen to recover from dropouts at each phase, or to abort cleanly below the threshold. A dropped
client never receives the request, exactly as if it were unreachable, and it stays dropped for
the rest of the round. Every request that is delivered is recorded as ``(phase, client_id)``.

:class:`FitFaults` fails chosen clients' plain fit tasks of chosen rounds (:class:`FitFault`):
before they reach the client, or after it trained (its reply lost on the way back, or arriving
with an update the server's checks reject). A client that trained has changed whatever state it
keeps between rounds, which a client that was never reached has not.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

import torch

from fedguard.protocol import messages
from fedguard.protocol.secagg import REQUEST_PHASES, Phase
from fedguard.protocol.transport import (
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    OutcomeWatcher,
    Transport,
)


class PhaseDropout(Transport):
    """Delivers through ``inner`` except to ``drops[phase]`` at that phase and later ones."""

    def __init__(self, inner: Transport, drops: Mapping[Phase, Collection[int]]) -> None:
        self.inner = inner
        self.drops = {phase: frozenset(ids) for phase, ids in drops.items()}
        self.delivered: list[tuple[Phase, int]] = []

    @property
    def client_ids(self) -> Sequence[int]:
        return self.inner.client_ids

    def _dropped(self, phase: Phase) -> frozenset[int]:
        out: frozenset[int] = frozenset()
        for p, ids in self.drops.items():
            if p <= phase:
                out |= ids
        return out

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        phase = None
        if requests:
            phase = REQUEST_PHASES.get(messages.kind_of(next(iter(requests.values()))))
        dropped = self._dropped(phase) if phase is not None else frozenset()
        passed = {cid: p for cid, p in requests.items() if cid not in dropped}
        if phase is not None:
            self.delivered.extend((phase, cid) for cid in passed)
        outcomes = {o.client_id: o for o in self.inner.exchange(passed, deadline_s=deadline_s)}
        reason = "dropped out" if phase is None else f"dropped out before {phase.name.lower()}"
        out: list[Outcome] = []
        for cid in requests:
            outcome = outcomes.get(cid)
            if outcome is None:
                outcome = Failed(cid, FailureKind.UNREACHABLE, reason)
                self._arrived(outcome)  # the inner transport never saw this client
            out.append(outcome)
        return out

    def watch(self, watcher: OutcomeWatcher | None) -> None:
        super().watch(watcher)
        self.inner.watch(watcher)

    def close(self) -> None:
        self.inner.close()


class FitFault(enum.StrEnum):
    """What becomes of a fit task in :class:`FitFaults`."""

    UNREACHABLE = "unreachable"  # the task never reaches the client, which does not train
    LOST = "lost"  # the client trains; its reply never reaches the server (a timeout)
    REJECTED = "rejected"  # the client trains; its reply arrives with a NaN update


class FitFaults(Transport):
    """Delivers through ``inner``, except the fit tasks that ``faults`` names by ``(round,
    client id)``: what becomes of each (see :class:`FitFault`). Other requests (evaluation,
    registration) pass unchanged. The outcomes it makes up are reported to a watcher once the
    exchange is done (``inner``'s own are not: a lost reply arrived there)."""

    def __init__(self, inner: Transport, faults: Mapping[tuple[int, int], FitFault]) -> None:
        self.inner = inner
        self.faults = dict(faults)
        self._clients = frozenset(cid for _, cid in self.faults)

    @property
    def client_ids(self) -> Sequence[int]:
        return self.inner.client_ids

    def _fault(self, client_id: int, payload: bytes) -> FitFault | None:
        if client_id not in self._clients or messages.kind_of(payload) != "FitTask":
            return None
        task = messages.decode(payload, messages.FitTask)
        return self.faults.get((task.round, client_id))

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        faults = {cid: f for cid in requests if (f := self._fault(cid, requests[cid])) is not None}
        passed = {
            cid: requests[cid] for cid in requests if faults.get(cid) is not FitFault.UNREACHABLE
        }
        outcomes = {o.client_id: o for o in self.inner.exchange(passed, deadline_s=deadline_s)}
        out: list[Outcome] = []
        for cid in requests:
            outcome = outcomes.get(cid)
            fault = faults.get(cid)
            if fault is FitFault.UNREACHABLE or outcome is None:
                outcome = Failed(cid, FailureKind.UNREACHABLE, "its fit task was lost")
            elif fault is FitFault.LOST and isinstance(outcome, Delivered):
                outcome = Failed(cid, FailureKind.TIMEOUT, "it trained; its reply was lost")
            elif fault is FitFault.REJECTED and isinstance(outcome, Delivered):
                reply = messages.decode(outcome.payload, messages.FitReply)
                poisoned = replace(reply, update=torch.full_like(reply.update, math.nan))
                outcome = replace(outcome, payload=messages.encode(poisoned))
            out.append(outcome)
            self._arrived(outcome)
        return out

    def close(self) -> None:
        self.inner.close()
