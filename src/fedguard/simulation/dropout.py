"""A transport wrapper that makes chosen clients drop out at chosen secure-aggregation phases.

Real deployments lose clients mid-round (a phone goes offline after sending its shares); this
wrapper reproduces that on top of any transport, so tests and benchmarks can check that a round
recovers from dropouts at each phase, or aborts cleanly below the threshold. A dropped client
never receives the request, exactly as if it were unreachable, and it stays dropped for the
rest of the round. Every request that is delivered is recorded as ``(phase, client_id)``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from fedguard.protocol import messages
from fedguard.protocol.secagg import REQUEST_PHASES, Phase
from fedguard.protocol.transport import Failed, FailureKind, Outcome, OutcomeWatcher, Transport


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
