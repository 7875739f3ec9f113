"""What the gRPC transport checks in a reply before the round driver sees it.

The driver already rejects unusable replies (it runs the same checks in simulation); the
transport checks the envelope-level facts a deployed server must refuse at the door, with a
gRPC status the sender sees: the payload decodes, it is the reply kind the task asks for, it
names the task's client and round, its float tensors are ``float32`` and finite, and a fit
update has the shape of the parameters it was computed from. A task's description is read from
the safetensors header of its payload only, so checking costs no copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.algorithms import finite
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
        header = messages.read_header(payload)
        return TaskInfo(
            _KIND_BY_NAME[header.kind],
            int(header.fields["round"]),
            int(header.fields["client_id"]),
            header.shapes.get("parameters"),
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
    wrong_address = messages.addressing_problem(reply, task.client_id, task.round)
    if wrong_address is not None:
        return wrong_address
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
        if not finite.all_finite(t):
            return f"{name!r} contains NaN or infinite values"
    return None
