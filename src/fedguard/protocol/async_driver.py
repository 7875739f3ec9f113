"""Asynchronous rounds: FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022), written once against a transport's :class:`ReplyStream`.

``concurrency`` clients train at once, each from the global model version current when it was
dispatched. A reply that passes the round driver's checks (the same as in a synchronous round:
addressing, shape, finite values, example claims cut to the registered size, the privacy plan's
reply check) joins the buffer with its staleness ``tau = version now - version sent``; a reply
staler than ``max_staleness`` is dropped and logged. Every ``buffer_size`` replies the server
aggregates the buffer's staleness-scaled updates ``s(tau_i) u_i`` (see
:mod:`fedguard.algorithms.optimizers.fedbuff`) with the strategy's aggregator and takes one server
optimizer step (:meth:`Strategy.aggregate_reporting`, which also says which clients a robust
rule left out): with the weighted mean that is the paper's
``x <- x + eta_g (1/K) sum_i s(tau_i) u_i`` for clients of equal size. The absurd-norm sanity
bound runs over the buffer before it is applied. Each applied buffer is a *round* (a new model
version): it gets a metrics row, an evaluation and a checkpoint like a synchronous round. After
each arrival the server dispatches new clients, drawn uniformly (seeded by the task number) from
those not already training, to keep ``concurrency`` busy.

Each applied buffer also lists what became of every task since the previous one
(:class:`TaskRecord`: replied and applied, failed, rejected, stale, or still training), for the
live view's per-client table.

State and resume (:class:`AsyncState`): the model version, the next task number, the stream's
clock, the buffer (the raw reply bytes of the buffered replies) and the in-flight tasks (their
exact task bytes, client, version and send time) are checkpointed after every applied buffer.
At a resume the in-flight tasks are sent again, byte for byte (same model version, same client,
same seed), as if first sent at their recorded time: in a simulation, whose outcome depends only
on the task, the resumed run equals the uninterrupted one; in a deployment the clients redo that
work and a reply to the stopped server's copy is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedguard.algorithms.optimizers import fedbuff
from fedguard.protocol import messages
from fedguard.protocol.aggregator import LeftOut
from fedguard.protocol.driver import RoundDriver, RoundFailedError, _unusable, client_seed
from fedguard.protocol.strategy import StrategyState
from fedguard.protocol.transport import Failed, Outcome, ReplyStream

log = logging.getLogger("fedguard.round")

DISPATCH_STREAM = 0xA57  # the seeding stream of the choice of the next client
# A run that dispatches this many times buffer_size tasks (plus the concurrency) without filling
# a buffer stops: its clients keep failing or being refused.
STALL_FACTOR = 50
TASK_PREFIX = "async.task."  # checkpoint tensors: an in-flight task's bytes
BUFFER_PREFIX = "async.buffer."  # checkpoint tensors: a buffered reply's bytes
INFO_KEY = "async"  # checkpoint info


@dataclass(frozen=True)
class AsyncSettings:
    """FedBuff's knobs: clients training at once, replies per server step, the stalest reply
    kept, the staleness function's exponent ``a`` in ``s(tau) = (1 + tau)^(-a)``, and the
    fewest replies a step takes (a robust aggregator's need for its ``f``)."""

    concurrency: int
    buffer_size: int
    max_staleness: int
    staleness_exponent: float = 0.5
    min_updates: int = 1

    def __post_init__(self) -> None:
        if self.min_updates > self.buffer_size:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) is below {self.min_updates}, the fewest "
                "updates the aggregator takes."
            )
        if self.concurrency < 1 or self.buffer_size < 1 or self.max_staleness < 0:
            raise ValueError(
                f"Need concurrency >= 1, buffer_size >= 1 and max_staleness >= 0, got "
                f"{self.concurrency}, {self.buffer_size}, {self.max_staleness}."
            )
        if not self.staleness_exponent >= 0:
            raise ValueError(
                f"The staleness exponent must be non-negative, got {self.staleness_exponent}."
            )


@dataclass(frozen=True)
class InFlight:
    """A dispatched task: its number, client, the model version it carries, when it was sent
    (stream clock) and its encoded bytes (re-sent at a resume)."""

    task: int
    client_id: int
    version: int
    sent_at: float
    payload: bytes


@dataclass(frozen=True)
class Buffered:
    """An accepted reply waiting in the buffer: its task, the version its model had, the
    checked (and capped) reply and its raw bytes (for the checkpoint)."""

    task: int
    version: int
    reply: messages.FitReply
    raw: bytes


@dataclass
class AsyncState:
    """Everything an asynchronous run needs to continue exactly (see the module docstring).
    ``dispatched`` lists every task's (client, round it trains towards) for the privacy plan."""

    version: int = 0
    next_task: int = 1
    clock: float = 0.0
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    buffer: list[Buffered] = field(default_factory=list)
    dispatched: list[tuple[int, int]] = field(default_factory=list)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The in-flight tasks' and the buffered replies' bytes, as uint8 tensors."""
        out = {f"{TASK_PREFIX}{f.task}": _as_tensor(f.payload) for f in self.in_flight.values()}
        out.update({f"{BUFFER_PREFIX}{b.task}": _as_tensor(b.raw) for b in self.buffer})
        return out

    def checkpoint_info(self) -> dict[str, Any]:
        """The JSON-able rest of the state."""
        return {
            "version": self.version,
            "next_task": self.next_task,
            "clock": self.clock,
            "in_flight": [
                [f.task, f.client_id, f.version, f.sent_at] for f in self.in_flight.values()
            ],
            "buffer": [[b.task, b.version] for b in self.buffer],
            "dispatched": [list(d) for d in self.dispatched],
        }

    @classmethod
    def restore(cls, info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> AsyncState:
        """The state :meth:`checkpoint_info` and :meth:`checkpoint_tensors` saved."""
        in_flight = {
            int(t): InFlight(
                int(t), int(c), int(v), float(s), _as_bytes(tensors[f"{TASK_PREFIX}{int(t)}"])
            )
            for t, c, v, s in info["in_flight"]
        }
        buffer = []
        for t, v in info["buffer"]:
            raw = _as_bytes(tensors[f"{BUFFER_PREFIX}{int(t)}"])
            buffer.append(Buffered(int(t), int(v), messages.decode(raw, messages.FitReply), raw))
        return cls(
            version=int(info["version"]),
            next_task=int(info["next_task"]),
            clock=float(info["clock"]),
            in_flight=in_flight,
            buffer=buffer,
            dispatched=[(int(c), int(r)) for c, r in info["dispatched"]],
        )


@dataclass(frozen=True)
class TaskRecord:
    """What became of one task by the time a buffer was applied: ``status`` is ``replied``
    (its reply was in the applied buffer), ``failed``, ``rejected``, ``stale`` or ``training``
    (still out); ``seconds`` from its sending to its outcome on the stream's clock (None while
    training, or for a reply restored from a checkpoint); ``staleness`` of a used reply."""

    client: int
    status: str
    reason: str | None = None
    seconds: float | None = None
    staleness: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as the live status reads it (:func:`fedguard.observe.status.task_statuses`)."""
        return {
            "client": self.client,
            "status": self.status,
            "reason": self.reason,
            "seconds": self.seconds,
            "staleness": self.staleness,
        }


@dataclass(frozen=True)
class AsyncRound:
    """One applied buffer: the new version ``round``, model, server state and metrics, the tasks
    dispatched since the previous one as (client, round), what the accepted replies reported
    as (round of the task, client, metrics) for the privacy plan, what became of each task since
    the previous buffer (``tasks``) and which clients the robust rule left out (``left_out``;
    None when the aggregator does not say)."""

    round: int
    params: torch.Tensor
    state: StrategyState
    metrics: dict[str, float | int | str | None]
    problems: list[tuple[int, str]]
    dispatched: list[tuple[int, int]]
    reported: list[tuple[int, int, dict[str, float]]]
    tasks: list[TaskRecord] = field(default_factory=list)
    left_out: LeftOut | None = None


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.uint8).contiguous().numpy().tobytes()


@dataclass
class _Tally:
    """What happened since the last applied buffer."""

    dispatched: list[tuple[int, int]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    failed: int = 0
    rejected: int = 0
    stale: int = 0
    capped: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # the outcomes that did not join the buffer, and when each buffered reply arrived
    records: list[TaskRecord] = field(default_factory=list)
    arrived_after: dict[int, float] = field(default_factory=dict)  # task -> seconds


class AsyncDriver:
    """Runs FedBuff over ``checks.transport``'s stream, checking replies as ``checks`` (the
    synchronous round driver of the same run) does."""

    def __init__(self, checks: RoundDriver, settings: AsyncSettings) -> None:
        if checks.secure_aggregation is not None:
            raise ValueError("Secure aggregation needs a cohort; it cannot run asynchronously.")
        if checks.before_aggregate is not None:
            raise ValueError("A before-aggregate hook needs a round's cohort; not asynchronous.")
        clients = len(checks.transport.client_ids)
        if settings.concurrency > clients:
            raise ValueError(
                f"concurrency ({settings.concurrency}) is more than the clients ({clients})."
            )
        extra = checks.strategy.required_tensors(checks.dim)
        if extra:
            raise ValueError(
                f"The strategy's replies carry {sorted(extra)}, which the staleness weight "
                "cannot scale; asynchronous rounds take a strategy of plain updates."
            )
        self.checks = checks
        self.settings = settings

    def _task_bytes(
        self, task: int, cid: int, round_: int, params: torch.Tensor, state: StrategyState
    ) -> bytes:
        strategy = self.checks.strategy
        config, tensors = strategy.fit_instructions(state)
        own = strategy.client_instructions(state, cid)
        seeded = {**config, **own, "seed": client_seed(self.checks.seed, task, cid)}
        return messages.encode(messages.FitTask(round_, cid, params, seeded, tensors))

    def _pick(self, task: int, busy: set[int]) -> int:
        idle = sorted(set(self.checks.transport.client_ids) - busy)
        rng = np.random.default_rng([self.checks.seed, task, DISPATCH_STREAM])
        return int(idle[int(rng.integers(len(idle)))])

    def rounds(
        self,
        params: torch.Tensor,
        state: StrategyState,
        run: AsyncState,
        *,
        until: int,
    ) -> Iterator[AsyncRound]:
        """Apply buffers until version ``until``, yielding each; ``run`` is updated in place and
        is the checkpointable state at every yield. Raises :class:`RoundFailedError` when no
        buffer fills in ``STALL_FACTOR * buffer_size + concurrency`` dispatches."""
        s = self.settings
        stream = self.checks.transport.stream(run.clock, self.checks.deadline_s)
        tally = _Tally()
        # a restored buffer holds the replies as sent: cut their claims again
        run.buffer = [
            replace(b, reply=self.checks._capped(b.reply, run.version + 1)[0]) for b in run.buffer
        ]
        try:
            for f in sorted(run.in_flight.values(), key=lambda f: f.task):
                stream.submit(f.task, f.client_id, f.payload, sent_at=f.sent_at)
            while run.version < until:
                self._fill(stream, run, tally, params, state)
                arrival = stream.next()
                run.clock = arrival.at
                sent = run.in_flight.pop(arrival.task)
                self._receive(sent, arrival.outcome, run, tally)
                if len(run.buffer) >= s.buffer_size:
                    applied = self._apply(run, tally, params, state)
                    if applied is not None:
                        params, state = applied.params, applied.state
                        tally = _Tally()
                        yield applied
                        continue
                if len(tally.dispatched) > STALL_FACTOR * s.buffer_size + s.concurrency:
                    raise RoundFailedError(
                        f"Round {run.version + 1}: {len(tally.dispatched)} tasks dispatched and "
                        f"no buffer of {s.buffer_size} filled. Problems: "
                        + "; ".join(f"client {c}: {r}" for c, r in tally.problems[-10:])
                    )
        finally:
            stream.close()

    def _fill(
        self,
        stream: ReplyStream,
        run: AsyncState,
        tally: _Tally,
        params: torch.Tensor,
        state: StrategyState,
    ) -> None:
        """Dispatch tasks of the current version until ``concurrency`` are in flight."""
        while len(run.in_flight) < self.settings.concurrency:
            task = run.next_task
            cid = self._pick(task, {f.client_id for f in run.in_flight.values()})
            round_ = run.version + 1
            payload = self._task_bytes(task, cid, round_, params, state)
            sent_at = stream.submit(task, cid, payload)
            run.in_flight[task] = InFlight(task, cid, run.version, sent_at, payload)
            run.next_task += 1
            run.dispatched.append((cid, round_))
            tally.dispatched.append((cid, round_))
            tally.bytes_down += len(payload)

    def _receive(self, sent: InFlight, outcome: Outcome, run: AsyncState, tally: _Tally) -> None:
        """Check one outcome and buffer it, or count why not."""
        version_now = run.version + 1
        seconds = run.clock - sent.sent_at  # run.clock is this outcome's arrival
        if isinstance(outcome, Failed):
            tally.failed += 1
            failure = f"{outcome.kind}: {outcome.reason}"
            tally.problems.append((sent.client_id, failure))
            tally.records.append(TaskRecord(sent.client_id, "failed", failure, seconds))
            log.warning(
                "round %d: client %d failed (%s): %s",
                version_now,
                sent.client_id,
                outcome.kind,
                outcome.reason,
            )
            return
        tally.bytes_up += len(outcome.payload)
        staleness = run.version - sent.version
        if staleness > self.settings.max_staleness:
            tally.stale += 1
            reason = f"stale: trained on version {sent.version}, {staleness} versions old"
            tally.problems.append((sent.client_id, reason))
            tally.records.append(TaskRecord(sent.client_id, "stale", reason, seconds, staleness))
            log.warning("round %d: client %d dropped, %s", version_now, sent.client_id, reason)
            return
        reply, reason = self.checks._check_fit_reply(outcome, sent.version + 1)
        if reply is None:
            tally.rejected += 1
            tally.problems.append((sent.client_id, f"rejected: {reason}"))
            tally.records.append(TaskRecord(sent.client_id, "rejected", reason, seconds))
            log.warning("round %d: client %d rejected: %s", version_now, sent.client_id, reason)
            return
        reply, was_capped = self.checks._capped(reply, version_now)
        tally.capped += was_capped
        tally.arrived_after[sent.task] = seconds
        run.buffer.append(Buffered(sent.task, sent.version, reply, outcome.payload))

    def _apply(
        self, run: AsyncState, tally: _Tally, params: torch.Tensor, state: StrategyState
    ) -> AsyncRound | None:
        """Aggregate the buffer into the next version; None (the buffer waits for more) when the
        sanity bound leaves fewer than ``min_clients`` replies."""
        replies = [b.reply for b in run.buffer]
        kept, absurd = self.checks._drop_absurd_norms(replies)
        round_ = run.version + 1
        if absurd:
            dropped = {id(r) for r in replies} - {id(r) for r in kept}
            run.buffer = [b for b in run.buffer if id(b.reply) not in dropped]
            for cid, reason in absurd:
                tally.rejected += 1
                tally.problems.append((cid, f"rejected: {reason}"))
                tally.records.append(TaskRecord(cid, "rejected", reason))
                log.warning("round %d: client %d rejected: %s", round_, cid, reason)
        if len(run.buffer) < self.settings.min_updates:
            return None
        staleness = torch.tensor([run.version - b.version for b in run.buffer])
        rows = fedbuff.scaled_updates(
            torch.stack([b.reply.update for b in run.buffer]),
            staleness,
            self.settings.staleness_exponent,
        )
        scaled = [replace(b.reply, update=row) for b, row in zip(run.buffer, rows, strict=True)]
        new_state, new_params, left_out = self.checks.strategy.aggregate_reporting(
            state, params, scaled, round_=round_
        )
        metrics: dict[str, float | int | str | None] = {
            "clients_sampled": len(tally.dispatched),
            "clients_completed": len(run.buffer),
            "clients_failed": tally.failed,
            "clients_rejected": tally.rejected,
            "clients_stale": tally.stale,
            "weights_capped": tally.capped,
            "staleness_mean": float(staleness.double().mean()),
            "staleness_max": int(staleness.max()),
            "bytes_up": tally.bytes_up,
            "bytes_down": tally.bytes_down,
            "aggregate_rejected": None,
            "simulated_seconds": run.clock,
        }
        refusal = _unusable(new_params, new_state)
        if refusal is not None:
            log.warning("round %d: %s; the model is unchanged, the run goes on", round_, refusal)
            metrics["aggregate_rejected"] = refusal
            new_state, new_params = state, params
        losses = [
            (b.reply.metrics["train_loss"], b.reply.num_examples)
            for b in run.buffer
            if np.isfinite(b.reply.metrics.get("train_loss", np.nan))
        ]
        n = sum(k for _, k in losses)
        metrics["train_loss"] = sum(v * k for v, k in losses) / n if n else None
        reported = [(b.version + 1, b.reply.client_id, dict(b.reply.metrics)) for b in run.buffer]
        tasks = _task_records(run, tally)
        run.buffer = []
        run.version = round_
        return AsyncRound(
            round_,
            new_params,
            new_state,
            metrics,
            tally.problems,
            tally.dispatched,
            reported,
            tasks,
            left_out,
        )


def _task_records(run: AsyncState, tally: _Tally) -> list[TaskRecord]:
    """Every task since the previous applied buffer, as the buffer is applied: the buffered
    replies (used), the outcomes that were not, then the tasks still out."""
    used = [
        TaskRecord(
            b.reply.client_id,
            "replied",
            None,
            tally.arrived_after.get(b.task),
            run.version - b.version,
        )
        for b in run.buffer
    ]
    training = [
        TaskRecord(f.client_id, "training")
        for f in sorted(run.in_flight.values(), key=lambda f: f.task)
    ]
    return used + tally.records + training
