"""What the gRPC transport checks in a reply before the round driver sees it.

The driver already rejects unusable replies (it runs the same checks in simulation); the
transport checks the envelope-level facts a deployed server must refuse at the door, with a
gRPC status the sender sees: the payload decodes, it is the reply kind the task asks for, it
names the task's client and round, its float tensors are ``float32`` and finite, and a fit
update has the shape of the parameters it was computed from. A task's description is read from
the safetensors header of its payload only, so checking costs no copy of the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from fedguard.protocol import messages

# The reply kind each task kind expects.
REPLY_KIND = {
    messages.FitTask: messages.FitReply,
    messages.EvaluateTask: messages.EvaluateReply,
    messages.SecAggSetup: messages.SecAggKeys,
    messages.SecAggShareRequest: messages.SecAggShares,
    messages.SecAggMaskRequest: messages.SecAggMaskedInput,
    messages.SecAggUnmaskRequest: messages.SecAggUnmaskReply,
}
_KIND_BY_NAME = {cls.__name__: cls for cls in REPLY_KIND}


@dataclass(frozen=True)
class TaskInfo:
    """A task's kind, round, client and, for tasks that carry a model, its parameter count."""

    kind: type
    round: int
    client_id: int
    parameters: tuple[int, ...] | None


def describe_task(payload: bytes) -> TaskInfo:
    """Read a task's :class:`TaskInfo` from its header; raises ``MessageError`` if malformed."""
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + header_len])
        head = json.loads(header["__metadata__"]["message"])
        kind = _KIND_BY_NAME[head["kind"]]
        fields = head["fields"]
        shape = header.get("parameters", {}).get("shape")
        return TaskInfo(
            kind,
            int(fields["round"]),
            int(fields["client_id"]),
            None if shape is None else tuple(shape),
        )
    except Exception as exc:  # any malformed task is one kind of error for the caller
        raise messages.MessageError(f"Not a task payload: {exc}") from exc


def reply_problem(task: TaskInfo, payload: bytes) -> str | None:
    """Why ``payload`` is not an acceptable reply to ``task``, or ``None`` if it is."""
    expected = REPLY_KIND[task.kind]
    try:
        reply = messages.decode(payload, expected)
    except messages.MessageError as exc:
        return str(exc)
    if reply.client_id != task.client_id or reply.round != task.round:
        return (
            f"reply is for client {reply.client_id} round {reply.round}, "
            f"expected client {task.client_id} round {task.round}"
        )
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(reply, messages.FitReply):
        tensors = {"update": reply.update, **reply.tensors}
        if task.parameters is not None and tuple(reply.update.shape) != task.parameters:
            return f"update has shape {tuple(reply.update.shape)}, expected {task.parameters}"
    if isinstance(reply, messages.SecAggMaskedInput):
        if reply.masked.dtype not in (torch.int32, torch.int64) or reply.masked.dim() != 1:
            return f"masked input must be a 1-D int32 or int64 vector, got {reply.masked.dtype}"
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            return f"{name!r} has dtype {t.dtype}, expected float32"
        if not bool(torch.isfinite(t).all()):
            return f"{name!r} contains NaN or infinite values"
    return None
