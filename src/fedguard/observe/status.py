"""The run's live status file, ``status.json``: where the run is, and how the current round went.

metrics.jsonl says what each finished round measured; a page that follows a run also needs what
is happening now: the round in progress and its sampled clients, the run's state (running,
completed, failed, ...), the time per round and the time left, the privacy budget. The runner
writes this file at the start and the end of every round, atomically (a temporary file, then
``os.replace``), so a reader never sees half of it.

Each client of the current round has a status (``sampled`` while the round runs, then
``replied``, ``failed`` or ``rejected``), the reason of a failure or rejection and, for a reply,
its latency in seconds. Only ids, states, reasons and timings: never data, updates or secrets.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

FILE = "status.json"
VERSION = 1
# The reason prefixes of the round driver's problems (``"<kind>: <reason>"``): a transport
# failure (error, timeout, unreachable), or a reply the checks refused.
FAILURE_KINDS = ("error", "timeout", "unreachable")
REJECTED = "rejected"


def client_statuses(
    sampled: Sequence[int],
    problems: Sequence[tuple[int, str]],
    latencies: Mapping[int, float],
) -> list[dict[str, Any]]:
    """One entry per sampled client: ``{"client", "status", "reason", "seconds"}``.

    ``problems`` are the driver's ``(client id, "kind: reason")`` pairs; a sampled client with no
    problem replied and was used. A client can both reply (a latency) and be rejected.
    """
    by_client: dict[int, str] = {}
    for cid, problem in problems:
        by_client.setdefault(int(cid), str(problem))
    out = []
    for cid in sampled:
        text = by_client.get(int(cid))
        status = "replied"
        reason: str | None = None
        if text is not None:
            kind, _, rest = text.partition(": ")
            status = "rejected" if kind == REJECTED else "failed"
            reason = rest if kind in (REJECTED, *FAILURE_KINDS) else text
            if status == "failed" and kind in FAILURE_KINDS:
                reason = f"{kind}: {rest}"
        seconds = latencies.get(int(cid))
        out.append(
            {
                "client": int(cid),
                "status": status,
                "reason": reason,
                "seconds": None if seconds is None else round(float(seconds), 4),
            }
        )
    return out


class StatusWriter:
    """Writes ``status.json`` in a run folder as the run goes (one instance per run).

    ``clock`` is passed in (wall seconds since the epoch) so that tests can fix it.
    """

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        rounds_planned: int,
        max_epsilon: float | None,
        delta: float | None,
        mode: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(root) / FILE
        self._clock = clock
        self._round_seconds: list[float] = []
        self._status: dict[str, Any] = {
            "version": VERSION,
            "name": name,
            "mode": mode,
            "state": "starting",
            "error": None,
            "started_at": clock(),
            "updated_at": clock(),
            "rounds_planned": rounds_planned,
            "rounds_done": 0,
            "seconds_per_round": None,
            "seconds_left": None,
            "privacy": {"max_epsilon": max_epsilon, "delta": delta, "epsilon": None},
            "current": None,
            "last": None,
        }

    @property
    def status(self) -> dict[str, Any]:
        """The status as last written (a copy)."""
        return json.loads(json.dumps(self._status))

    def resumed(self, rounds_done: int, epsilon: float | None) -> None:
        """A resumed run starts after ``rounds_done`` finished rounds."""
        self._status["rounds_done"] = rounds_done
        self._status["privacy"]["epsilon"] = epsilon
        self._write()

    def round_started(self, round_: int, sampled: Sequence[int]) -> None:
        """Round ``round_`` went out to ``sampled`` (every client ``sampled`` until it answers)."""
        self._status["state"] = "running"
        self._status["current"] = {
            "round": round_,
            "phase": "training",
            "started_at": self._clock(),
            "clients": [
                {"client": int(c), "status": "sampled", "reason": None, "seconds": None}
                for c in sampled
            ],
        }
        self._write()

    def round_finished(
        self,
        round_: int,
        row: Mapping[str, Any],
        clients: list[dict[str, Any]],
        seconds: float | None,
    ) -> None:
        """Round ``round_`` is finished: its metrics row, each client's outcome, its duration."""
        if seconds is not None:
            self._round_seconds.append(float(seconds))
        done = {
            "round": round_,
            "phase": "done",
            "clients": clients,
            "clients_sampled": row.get("clients_sampled"),
            "clients_completed": row.get("clients_completed"),
            "clients_failed": row.get("clients_failed"),
            "clients_rejected": row.get("clients_rejected"),
            "clients_excluded": row.get("clients_excluded"),
            "aggregate_rejected": row.get("aggregate_rejected"),
            "secure_aggregation_aborted": row.get("secure_aggregation_aborted"),
            "bytes_up": row.get("bytes_up"),
            "bytes_down": row.get("bytes_down"),
        }
        self._status["current"] = done
        self._status["last"] = done
        self._status["rounds_done"] = round_
        if row.get("epsilon") is not None:
            self._status["privacy"]["epsilon"] = row["epsilon"]
        self._estimate()
        self._write()

    def finished(self, state: str, error: str | None, epsilon: float | None) -> None:
        """The run ended: ``completed``, ``budget_spent``, ``failed`` or ``interrupted``."""
        self._status["state"] = state
        self._status["error"] = error
        self._status["seconds_left"] = 0.0 if state == "completed" else None
        if epsilon is not None:
            self._status["privacy"]["epsilon"] = epsilon
        current = self._status["current"]
        if current is not None and current.get("phase") == "training":
            self._status["current"] = self._status["last"]  # the round that never finished
        self._write()

    def _estimate(self) -> None:
        """Seconds per round: the mean of the last 20 rounds; time left: that times the rounds
        still to run."""
        recent = self._round_seconds[-20:]
        if not recent:
            return
        per_round = sum(recent) / len(recent)
        left = max(0, self._status["rounds_planned"] - self._status["rounds_done"])
        self._status["seconds_per_round"] = per_round
        self._status["seconds_left"] = per_round * left

    def _write(self) -> None:
        self._status["updated_at"] = self._clock()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(json_safe(self._status), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def json_safe(value: Any) -> Any:
    """``value`` with what a browser's ``JSON.parse`` refuses made plain: NaN and infinities
    become None, numpy and torch scalars numbers, anything else unknown its text."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        return json_safe(item())
    return str(value)
