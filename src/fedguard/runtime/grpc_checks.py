"""What the gRPC transport checks in a reply before the round driver sees it.

The driver already rejects unusable replies (it runs the same checks in simulation); the
transport checks the envelope-level facts a deployed server must refuse at the door, with a
gRPC status the sender sees: the payload decodes, it is the reply kind the task asks for, it
names the task's client and round, its float tensors are ``float32`` and finite, and a fit
update has the shape of the parameters it was computed from. A task's description is read from
the safetensors header of its payload only, so checking costs no copy of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedguard.algorithms import finite
from fedguard.protocol import features, messages

# The reply kind each task kind expects.
REPLY_KIND: dict[type[messages.Message], type[messages.Message]] = {
    messages.FitTask: messages.FitReply,
    messages.EvaluateTask: messages.EvaluateReply,
    messages.RegisterTask: messages.Registration,
    messages.SecAggSetup: messages.SecAggKeys,
    messages.SecAggRevealRequest: messages.SecAggReveal,
    messages.SecAggShareRequest: messages.SecAggShares,
    messages.SecAggMaskRequest: messages.SecAggMaskedInput,
    messages.SecAggConsistencyRequest: messages.SecAggConsistencySignature,
    messages.SecAggUnmaskRequest: messages.SecAggUnmaskReply,
    messages.HeEncryptRequest: messages.HeEncrypted,
    messages.HeDecryptRequest: messages.HeDecrypted,
}
_KIND_BY_NAME = {cls.__name__: cls for cls in REPLY_KIND}


# What a reply may weigh beyond the tensors its task implies: the safetensors and JSON headers,
# metrics and byte-map layouts (the schema bounds their entries and names).
HEADER_MARGIN_BYTES = 1 << 20
# One encrypted share bundle or Shamir share per peer is a few dozen bytes; this bounds one
# entry of a secure-aggregation reply's byte map with room to spare.
SECAGG_ENTRY_BYTES = 4096
# A phase-0 reply: two X25519 public keys, an Ed25519 signature and a commitment; also bounds a
# graph reveal and a consistency signature (their tasks imply no larger reply).
SECAGG_KEYS_BYTES = 4096
# An encrypted update: SEAL's compressed ciphertexts take about 15 bytes per value under BFV and
# 30 under CKKS (half as many slots); this bounds both, plus a few kB per ciphertext of headers.
HE_BYTES_PER_VALUE = 64
HE_BYTES_PER_CIPHERTEXT = 8192


@dataclass(frozen=True)
class TaskInfo:
    """A task's kind, round, client and, for tasks that carry a model, its parameter count;
    ``reply_limit`` is the most bytes an acceptable reply to it can have."""

    kind: type
    round: int
    client_id: int
    parameters: tuple[int, ...] | None
    reply_limit: int = HEADER_MARGIN_BYTES


def describe_task(payload: bytes) -> TaskInfo:
    """Read a task's :class:`TaskInfo` from its header; raises ``MessageError`` if malformed."""
    try:
        header = messages.read_header(payload)
        kind = _KIND_BY_NAME[header.kind]
        return TaskInfo(
            kind,
            int(header.fields["round"]),
            int(header.fields["client_id"]),
            header.shapes.get("parameters"),
            HEADER_MARGIN_BYTES + _reply_bytes(kind, header),
        )
    except Exception as exc:  # any malformed task is one kind of error for the caller
        raise messages.MessageError(f"Not a task payload: {exc}") from exc


def _reply_bytes(kind: type, header: messages.Header) -> int:
    """The bytes of the tensors an honest reply to a task with ``header`` carries.

    A fit reply: the update (float32, the parameters' length), one float32 tensor the size of
    each tensor the task sent (SCAFFOLD's control variate comes back as ``control_delta``) and,
    for a Newton client, the gradient and Hessian sums (``d + d * d`` floats), for a FedNova
    client its step norm (one float). A masked input:
    ``d + 1`` ring elements of at most 8 bytes. Shares: one bounded entry per peer named in the
    task. An evaluation reply: the int64 score histograms and confusion matrix its task asks
    for (``C * 2 * bins + C * C`` counts). Keys and registrations carry no tensor of the model's
    size.
    """
    if kind in (messages.FitTask, messages.SecAggMaskRequest):
        d = math.prod(header.shapes["parameters"])
        if kind is messages.SecAggMaskRequest:
            return 8 * (d + 1)
        sent = sum(math.prod(s) for n, s in header.shapes.items() if n.startswith("tensors."))
        config = header.fields.get("config", {})
        newton = config.get("optimizer") == "newton"
        fednova = config.get(features.FEDNOVA) is True  # its step norm, one float
        return 4 * (d + sent + (d + d * d if newton else 0) + (1 if fednova else 0))
    if kind is messages.HeEncryptRequest:
        d = math.prod(header.shapes["parameters"]) + 1
        return HE_BYTES_PER_VALUE * d + HE_BYTES_PER_CIPHERTEXT * (d // 2048 + 1)
    if kind is messages.HeDecryptRequest:
        return 8 * (int(header.fields["dim"]) + 1)
    if kind is messages.SecAggShareRequest:
        # a bundle per peer and a share commitment per holder (the peers and the client)
        return SECAGG_ENTRY_BYTES * (header.shapes["map_ids.public_keys"][0] + 1)
    if kind is messages.SecAggUnmaskRequest:
        peers = header.shapes["ids.alive"][0] + header.shapes["ids.dropped"][0]
        return SECAGG_ENTRY_BYTES * peers
    if kind is messages.SecAggSetup:
        return SECAGG_KEYS_BYTES
    if kind is messages.EvaluateTask:
        config = header.fields.get("config", {})
        bins, classes = config.get(messages.EVAL_BINS), config.get(messages.EVAL_CLASSES)
        if isinstance(bins, int) and isinstance(classes, int):
            return 8 * (classes * 2 * bins + classes * classes)
    return 0


def reply_problem(task: TaskInfo, payload: bytes) -> str | None:
    """Why ``payload`` is not an acceptable reply to ``task``, or ``None`` if it is."""
    try:
        return _problem(task, payload)
    except Exception as exc:  # a check that trips on a reply is that reply's problem
        return messages.printable(f"the reply could not be checked: {type(exc).__name__}: {exc}")


def _problem(task: TaskInfo, payload: bytes) -> str | None:
    expected = REPLY_KIND[task.kind]
    try:
        reply = messages.decode(payload, expected)
    except messages.MessageError as exc:
        return str(exc)
    wrong_address = messages.addressing_problem(reply, task.client_id, task.round)
    if wrong_address is not None:
        return wrong_address
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(reply, messages.FitReply):
        tensors = {"update": reply.update, **reply.tensors}
        if task.parameters is not None and tuple(reply.update.shape) != task.parameters:
            return f"update has shape {tuple(reply.update.shape)}, expected {task.parameters}"
    if isinstance(reply, messages.HeDecrypted) and reply.plain.dim() != 1:
        return f"a decrypted sum must be a 1-D vector, got shape {tuple(reply.plain.shape)}"
    if isinstance(reply, messages.SecAggMaskedInput):
        if reply.masked.dtype not in (torch.int32, torch.int64) or reply.masked.dim() != 1:
            return f"masked input must be a 1-D int32 or int64 vector, got {reply.masked.dtype}"
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            return f"{name!r} has dtype {t.dtype}, expected float32"
        if not finite.all_finite(t):
            return f"{name!r} contains NaN or infinite values"
    return None
