"""Registration: what a server that holds no data learns from its clients before round 1.

Both halves of one exchange, in one module. The server sends each client a
:class:`~fedguard.protocol.messages.RegisterTask` holding its model's signature and the
rounding of example counts it asks for; each client answers with a
:class:`~fedguard.protocol.messages.Registration`: its training and held-out example counts,
rounded *up* to a multiple of its bucket, and its own model's signature. The server admits a
registration whose signature is its own and whose counts are whole multiples of a bucket at
least as coarse as asked, at least one training example and at most ``max_examples``; every other
client is refused, with one logged line saying why, and takes no part in the run.

What the counts are for, and why rounding up is enough: the server uses a registered count only
as an upper bound. It caps the weight a fit reply may claim (:class:`.driver.RoundDriver`'s
``registered_examples``), sets secure aggregation's default weight cap (the fixed-point range
of the sum), caps an evaluation reply's weight, and gives the local-DP plan each client's range
of sizes, ``[count - bucket + 1, count]``, from which it takes the conservative end (the largest
sampling rate, the most steps) for a round without a report. A count rounded up stays an upper
bound, so no honest client's weight is ever cut, and no privacy budget is spent on it.

Rounding happens on the client, in :func:`registration_reply`, so the exact count never leaves
it; the client rounds to the coarser of the server's request and its own configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedguard.models.paramspec import ParamSpec
from fedguard.protocol import messages
from fedguard.protocol.transport import Failed, Transport

log = logging.getLogger("fedguard.registration")

REGISTRATION_ROUND = 0  # rounds are numbered from 1; registration comes before them


class RegistrationRefused(RuntimeError):
    """The server's model is not this client's: retrying cannot help (the client stops)."""


def model_signature(spec: ParamSpec) -> str:
    """The SHA-256 (hex) of the model's parameter names, shapes and dtypes, in order.

    Two models with one signature exchange flat vectors that mean the same thing; a different
    architecture, input shape, class count or framework (whose tensor names differ) changes it.
    """
    layout = [[t.name, list(t.shape), t.dtype] for t in spec.tensors]
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


def describe(spec: ParamSpec) -> str:
    """The model a signature stands for, in words (for refusals)."""
    return f"{len(spec.tensors)} tensors, {spec.size:,} parameters"


def round_up(count: int, bucket: int) -> int:
    """``count`` rounded up to a multiple of ``bucket`` (0 stays 0)."""
    if count < 0 or bucket < 1:
        raise ValueError(f"Cannot round count {count} to a bucket of {bucket}.")
    return -(-count // bucket) * bucket


@dataclass(frozen=True)
class Registered:
    """One admitted client's registration: counts rounded up to ``count_bucket``."""

    num_examples: int
    eval_examples: int
    count_bucket: int

    @property
    def fewest_examples(self) -> int:
        """The smallest training-set size consistent with the rounded count."""
        return max(1, self.num_examples - self.count_bucket + 1)

    def to_json(self) -> list[int]:
        return [self.num_examples, self.eval_examples, self.count_bucket]

    @classmethod
    def from_json(cls, row: Iterable[int]) -> Registered:
        n, e, b = (int(v) for v in row)
        return cls(n, e, b)


@dataclass(frozen=True)
class Limits:
    """What the server admits: its model's ``signature`` (and ``model`` in words), counts
    rounded to at least ``count_bucket``, at most ``max_examples`` training examples."""

    signature: str
    model: str
    count_bucket: int
    max_examples: int


@dataclass
class Registry:
    """The outcome of registration: the admitted clients, and why each other one is out."""

    clients: dict[int, Registered] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)

    @property
    def sizes(self) -> dict[int, int]:
        """Each admitted client's registered training count (an upper bound of its size)."""
        return {cid: r.num_examples for cid, r in sorted(self.clients.items())}

    @property
    def eval_sizes(self) -> dict[int, int]:
        """The admitted clients that hold held-out data, and their registered counts of it."""
        return {cid: r.eval_examples for cid, r in sorted(self.clients.items()) if r.eval_examples}

    def to_json(self) -> dict[str, list[int]]:
        return {str(cid): r.to_json() for cid, r in sorted(self.clients.items())}


def problem(reply: messages.Registration, limits: Limits) -> str | None:
    """Why ``reply`` cannot be admitted under ``limits``, or None if it can."""
    if reply.model_signature != limits.signature:
        return (
            f"its model signature {reply.model_signature[:12]}... differs from the server's "
            f"{limits.signature[:12]}... ({limits.model}): it runs another model, input shape, "
            "class count or framework"
        )
    b = reply.count_bucket
    if b < limits.count_bucket:
        return f"it rounds its counts to {b}, the server asks for at least {limits.count_bucket}"
    if reply.num_examples < 1:
        return "it registers no training examples"
    if reply.num_examples > limits.max_examples:
        return (
            f"it registers {reply.num_examples:,} training examples, more than "
            f"registration.max_examples = {limits.max_examples:,} (an absurd count)"
        )
    if reply.eval_examples > limits.max_examples:
        return (
            f"it registers {reply.eval_examples:,} held-out examples, more than "
            f"registration.max_examples = {limits.max_examples:,} (an absurd count)"
        )
    if reply.num_examples % b or reply.eval_examples % b:
        return (
            f"its counts {reply.num_examples} and {reply.eval_examples} are not multiples of "
            f"its bucket {b}"
        )
    return None


def register(
    transport: Transport, client_ids: Iterable[int], limits: Limits, *, deadline_s: float | None
) -> Registry:
    """Ask ``client_ids`` to register over ``transport``; admit or refuse each reply."""
    config: dict[str, messages.Scalar] = {
        messages.REGISTER_SIGNATURE: limits.signature,
        messages.REGISTER_BUCKET: limits.count_bucket,
    }
    requests = {
        cid: messages.encode(messages.RegisterTask(REGISTRATION_ROUND, cid, config))
        for cid in client_ids
    }
    registry = Registry()
    for outcome in transport.exchange(requests, deadline_s=deadline_s):
        cid = outcome.client_id
        if isinstance(outcome, Failed):
            reason = f"did not register ({outcome.kind}: {outcome.reason})"
        else:
            admitted, refusal = _admit(outcome.payload, cid, limits)
            if admitted is not None:
                registry.clients[cid] = admitted
                continue
            reason = f"refused: {refusal}"
        registry.refused[cid] = reason
        log.warning("registration: client %d %s", cid, messages.printable(reason))
    return registry


def _admit(payload: bytes, client_id: int, limits: Limits) -> tuple[Registered | None, str]:
    """The registration in ``payload`` if it can be admitted, else None and why not."""
    try:
        reply = messages.decode(payload, messages.Registration)
    except messages.MessageError as exc:
        return None, str(exc)
    refusal = messages.addressing_problem(reply, client_id, REGISTRATION_ROUND) or problem(
        reply, limits
    )
    if refusal is not None:
        return None, refusal
    return Registered(reply.num_examples, reply.eval_examples, reply.count_bucket), ""


def registration_reply(
    task: messages.RegisterTask,
    *,
    spec: ParamSpec,
    num_examples: int,
    eval_examples: int,
    own_bucket: int = 1,
) -> messages.Registration:
    """The client half: this client's registration, its counts rounded up to the coarser of the
    server's bucket and ``own_bucket``; raises :class:`RegistrationRefused` when the server's
    model signature is not this client's model's."""
    own = model_signature(spec)
    theirs = task.config.get(messages.REGISTER_SIGNATURE)
    if theirs != own:
        shown = f"{theirs[:12]}..." if isinstance(theirs, str) else repr(theirs)
        raise RegistrationRefused(
            f"Client {task.client_id}: the server's model (signature {shown}) is not this "
            f"client's ({own[:12]}..., {describe(spec)}): check model.name, model.framework, "
            "model.input_shape and model.num_classes on both sides."
        )
    asked = messages.config_int(task.config, messages.REGISTER_BUCKET, 1)
    bucket = max(1, asked, own_bucket)
    return messages.Registration(
        round=task.round,
        client_id=task.client_id,
        num_examples=round_up(num_examples, bucket),
        eval_examples=round_up(eval_examples, bucket),
        count_bucket=bucket,
        model_signature=own,
    )
