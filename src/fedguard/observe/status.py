"""The run's live status file, ``status.json``: where the run is, and how the current round went.

metrics.jsonl says what each finished round measured; a page that follows a run also needs what
is happening now: the round in progress and its sampled clients, the run's state (running,
completed, failed, ...), the time per round and the time left, the privacy budget. The runner
writes this file at the start and the end of every round, and as the clients' replies arrive
during a round (at most every ``min_interval_s``, half a second by default, so a round of a
thousand quick replies does not write a thousand files; a reply held back is written when the
interval has passed, by a timer, so a burst followed by a straggler does not leave the page
behind), always atomically (a temporary file, then ``os.replace``), so a reader never sees half of it.

Each client of the current round has a status (``sampled`` until its reply or failure arrives,
then ``replied`` or ``failed``; at the round's end ``rejected`` if the checks refused its reply),
the reason of a failure or rejection and, for a reply, its latency in seconds. A robust rule's
verdict comes with the round's end: ``left_out_by`` names the rule that left the client's update
out of the aggregate (Krum, Multi-Krum, Bulyan), ``trimmed_share`` the share of its coordinates
a trimmed mean cut. Asynchronous (FedBuff) rounds list each task since the previous applied
buffer: ``replied`` (in the buffer applied), ``failed``, ``rejected``, ``stale`` (too old to use)
or ``training`` (still out), with its staleness. Only ids, states, reasons and timings: never
data, updates or secrets.
"""

from __future__ import annotations

import json
import math
import os
import threading
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


# A round's per-client fields besides its status: what the round's robust rule did to it.
VERDICT_FIELDS = ("left_out_by", "trimmed_share")
# How often replies arriving during a round may rewrite the file (seconds).
MIN_INTERVAL_S = 0.5


def _verdict(
    client: int,
    left_out_by: str | None,
    left_out: Sequence[int],
    trimmed: Mapping[int, float] | None,
) -> dict[str, Any]:
    """``{"left_out_by", "trimmed_share"}`` of one client: the rule's name if it left the
    client's update out, the share of its coordinates a trim cut."""
    share = None if trimmed is None else trimmed.get(client)
    return {
        "left_out_by": left_out_by if client in left_out else None,
        "trimmed_share": None if share is None else round(float(share), 4),
    }


def client_statuses(
    sampled: Sequence[int],
    problems: Sequence[tuple[int, str]],
    latencies: Mapping[int, float],
    *,
    rule: str | None = None,
    left_out: Sequence[int] = (),
    trimmed: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """One entry per sampled client: ``{"client", "status", "reason", "seconds",
    "left_out_by", "trimmed_share"}``.

    ``problems`` are the driver's ``(client id, "kind: reason")`` pairs; a sampled client with no
    problem replied and was used, unless the robust rule ``rule`` left it out (``left_out``).
    ``trimmed`` is a trimming rule's share of each client's coordinates cut. A client can both
    reply (a latency) and be rejected.
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
                **_verdict(int(cid), rule, left_out, trimmed),
            }
        )
    return out


def task_statuses(
    tasks: Sequence[Mapping[str, Any]],
    *,
    rule: str | None = None,
    verdicts: Sequence[tuple[bool, float | None]] = (),
) -> list[dict[str, Any]]:
    """The entries of an asynchronous round: one per task since the previous applied buffer,
    ``{"client", "status", "reason", "seconds", "staleness", "left_out_by", "trimmed_share"}``.

    ``tasks`` are the async driver's records
    (:class:`fedguard.protocol.async_driver.TaskRecord` as mappings), the buffer's replies
    (``replied``) first in the order they were aggregated; ``verdicts`` is the rule ``rule``'s
    ``(left out, share trimmed)`` of each of those replies, in the same order (a client may
    have two replies in one buffer, so the verdict goes by reply, not by client).
    """
    out = []
    used = 0
    for task in tasks:
        seconds = task.get("seconds")
        left_out, share = False, None
        if task["status"] == "replied" and used < len(verdicts):
            left_out, share = verdicts[used]
            used += 1
        out.append(
            {
                "client": int(task["client"]),
                "status": str(task["status"]),
                "reason": task.get("reason"),
                "seconds": None if seconds is None else round(float(seconds), 4),
                "staleness": task.get("staleness"),
                "left_out_by": rule if left_out else None,
                "trimmed_share": None if share is None else round(float(share), 4),
            }
        )
    return out


# Runs ``action`` after ``delay`` seconds; returns what cancels it.
Scheduler = Callable[[float, Callable[[], None]], Callable[[], None]]


def _timer(delay: float, action: Callable[[], None]) -> Callable[[], None]:
    """:data:`Scheduler` on a daemon :class:`threading.Timer` (a run that ends never waits)."""
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.start()
    return timer.cancel


class StatusWriter:
    """Writes ``status.json`` in a run folder as the run goes (one instance per run).

    ``clock`` (wall seconds since the epoch) and ``schedule`` (how a held-back reply's write is
    run later: a timer) are passed in so that tests can script them.
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
        min_interval_s: float = MIN_INTERVAL_S,
        schedule: Scheduler = _timer,
    ) -> None:
        self.path = Path(root) / FILE
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._schedule = schedule
        self._cancel: Callable[[], None] | None = None  # the held-back write's timer
        self._last_write: float | None = None
        self._pending = False  # a reply arrived that the file does not show yet
        self._lock = threading.RLock()  # replies may arrive on a transport's threads
        self.writes = 0  # files written so far (what the rate limit is tested by)
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
    def pending(self) -> bool:
        """Whether an arrival is not in the file yet (the rate limit held it back)."""
        return self._pending

    @property
    def status(self) -> dict[str, Any]:
        """The status as last updated (a copy; the file may lag it by ``min_interval_s``)."""
        with self._lock:
            return json.loads(json.dumps(self._status))

    def client_arrived(
        self,
        round_: int,
        client: int,
        *,
        failed: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """A client of round ``round_`` answered (``seconds``: its latency) or failed
        (``failed``: ``"kind: reason"``), before the round's end. The file is rewritten if the
        last write is ``min_interval_s`` old, else at the next chance (a later reply past the
        interval, the timer set for the interval's end, or the round's end:
        :meth:`round_finished` always writes). An outcome of another round than the current
        one (a late one) is ignored."""
        with self._lock:
            current = self._status["current"]
            if current is None or current.get("round") != round_:
                return
            if current.get("phase") != "training":
                return
            for entry in current["clients"]:
                if entry["client"] != int(client):
                    continue
                entry["status"] = "failed" if failed is not None else "replied"
                entry["reason"] = failed
                entry["seconds"] = None if seconds is None else round(float(seconds), 4)
                break
            else:
                return
            now = self._clock()
            if self._last_write is not None and now - self._last_write < self._min_interval_s:
                self._pending = True
                if self._cancel is None:
                    wait = self._min_interval_s - (now - self._last_write)
                    self._cancel = self._schedule(wait, self._write_held_back)
                return
            self._write_locked()

    def _write_held_back(self) -> None:
        """The timer's write of the replies held back (nothing if a write came first)."""
        with self._lock:
            self._cancel = None
            if self._pending:
                self._write_locked()

    def resumed(self, rounds_done: int, epsilon: float | None) -> None:
        """A resumed run starts after ``rounds_done`` finished rounds."""
        with self._lock:
            self._status["rounds_done"] = rounds_done
            self._status["privacy"]["epsilon"] = epsilon
            self._write()

    def round_started(self, round_: int, sampled: Sequence[int]) -> None:
        """Round ``round_`` went out to ``sampled`` (every client ``sampled`` until it answers)."""
        with self._lock:
            self._status["state"] = "running"
            self._status["current"] = {
                "round": round_,
                "phase": "training",
                "started_at": self._clock(),
                "clients": [
                    {
                        "client": int(c),
                        "status": "sampled",
                        "reason": None,
                        "seconds": None,
                        **dict.fromkeys(VERDICT_FIELDS),
                    }
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
        """Round ``round_`` is finished: its metrics row, each client's outcome, its duration
        (also what arrived since the last write, which this write carries)."""
        with self._lock:
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
                "robust_rule": row.get("robust_rule"),
                "clients_left_out": row.get("clients_left_out"),
                "left_out_clients": row.get("left_out_clients"),
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
        with self._lock:
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
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        """Write the file now (the caller holds the lock)."""
        now = self._clock()
        self._status["updated_at"] = now
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(json_safe(self._status), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        self._last_write = now
        self._pending = False
        if self._cancel is not None:  # this write carries what the timer was to write
            self._cancel()
            self._cancel = None
        self.writes += 1


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
