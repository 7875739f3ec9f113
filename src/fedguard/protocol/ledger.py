"""The bookkeeping of one aggregation round that runs in several exchanges (secure aggregation by
masking, aggregation under homomorphic encryption): bytes each way, the clients left out and why,
and the round's metrics.

Both protocols ask the same of every reply before they look inside it: the exchange did not fail,
the payload decodes into the kind the phase expects, and it is addressed to the round and the
client it came from. :meth:`RoundLedger.receive` is that check, so a reply that fails it is
counted, logged and named in the round's problems the same way in both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from fedguard.protocol import messages
from fedguard.protocol.transport import Failed, Outcome

log = logging.getLogger("fedguard.round")

_Reply = TypeVar("_Reply", bound=messages.Message)


@dataclass
class RoundLedger:
    """Bytes and problems over the exchanges of one round.

    ``protocol`` names the round kind in log lines ("secure aggregation", "HE"). A client left
    out is *rejected* when what it sent was wrong (it answered, so it is not a failure), and
    *failed* otherwise; the metrics count both, as a plain round's do.
    """

    round: int
    sampled: int
    protocol: str
    verb: str = "dropped"  # how the log says a client was left out ("dropped", "excluded")
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    def drop(
        self, phase: Enum | str, client_id: int, reason: str, *, rejected: bool = False
    ) -> None:
        """Leave ``client_id`` out of the round at ``phase`` for ``reason`` (logged, recorded)."""
        name = phase if isinstance(phase, str) else phase.name.lower()
        self.rejected += rejected
        self.problems.append((client_id, f"{name}: {reason}"))
        log.warning(
            "round %d: %s %s: client %d %s: %s",
            self.round,
            self.protocol,
            name,
            client_id,
            self.verb,
            reason,
        )

    def receive(
        self,
        phase: Enum | str,
        outcome: Outcome,
        expected: type[_Reply],
        *,
        rejected: bool = False,
    ) -> _Reply | None:
        """The decoded reply of one exchange outcome, or None after recording why not: the
        exchange failed, the payload is not an ``expected`` message, or it is addressed to
        another client or round (counted as ``rejected`` if the caller's protocol says so). The
        reply's bytes are counted either way."""
        cid = outcome.client_id
        if isinstance(outcome, Failed):
            self.drop(phase, cid, f"{outcome.kind}: {outcome.reason}")
            return None
        self.bytes_up += len(outcome.payload)
        try:
            reply = messages.decode(outcome.payload, expected)
        except messages.MessageError as exc:
            self.drop(phase, cid, str(exc), rejected=rejected)
            return None
        wrong = messages.addressing_problem(reply, cid, self.round)
        if wrong is not None:
            self.drop(phase, cid, wrong, rejected=rejected)
            return None
        return reply

    def metrics(self, completed: int) -> dict[str, float | int | None]:
        """The round's metrics with ``completed`` clients in its result."""
        return {
            "clients_sampled": self.sampled,
            "clients_completed": completed,
            "clients_failed": self.sampled - completed - self.rejected,
            "clients_rejected": self.rejected,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "train_loss": None,
        }
