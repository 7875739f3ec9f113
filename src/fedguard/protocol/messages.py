"""The messages of a round and their wire encoding.

A message is a frozen dataclass of scalars plus named ``float32`` tensors. On the wire it is one
safetensors blob whose metadata holds the scalars as JSON, so the in-process transport, Ray and
gRPC carry exactly the same bytes, and tests of the simulator exercise the real encoding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

Scalar = bool | int | float | str | None


class MessageError(ValueError):
    """A payload that cannot be decoded into a message of the expected kind."""


@dataclass(frozen=True)
class FitTask:
    """Server to client: train from ``parameters`` with the round's ``config``."""

    round: int
    client_id: int
    parameters: torch.Tensor
    config: dict[str, Scalar] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FitReply:
    """Client to server: ``update = local - global``, the example count and training metrics."""

    round: int
    client_id: int
    update: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateTask:
    """Server to client: evaluate ``parameters`` on the client's own held-out data."""

    round: int
    client_id: int
    parameters: torch.Tensor
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateReply:
    """Client to server: evaluation metrics on ``num_examples`` local examples."""

    round: int
    client_id: int
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


Message = FitTask | FitReply | EvaluateTask | EvaluateReply
_KINDS: dict[str, type] = {
    cls.__name__: cls for cls in (FitTask, FitReply, EvaluateTask, EvaluateReply)
}
_TENSOR_FIELDS = {"parameters", "update"}


def encode(message: Message) -> bytes:
    """Serialise a message to bytes (safetensors with the scalar fields as JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in _TENSOR_FIELDS:
            tensors[f.name] = value.detach().to(torch.float32).contiguous()
        elif f.name == "tensors":
            for key, t in value.items():
                tensors[f"tensors.{key}"] = t.detach().contiguous()
        else:
            scalars[f.name] = value
    header = json.dumps({"kind": type(message).__name__, "fields": scalars})
    return _st_save(tensors, metadata={"message": header})


def decode(payload: bytes, expected: type | None = None) -> Message:
    """Parse bytes made by :func:`encode`; ``expected`` checks the message kind."""
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        meta = json.loads(payload[8 : 8 + header_len])["__metadata__"]
        header = json.loads(meta["message"])
        cls = _KINDS[header["kind"]]
        raw = _st_load(payload)
    except Exception as exc:  # any malformed payload is one kind of error for the caller
        raise MessageError(f"Malformed message payload: {exc}") from exc
    if expected is not None and cls is not expected:
        raise MessageError(f"Expected a {expected.__name__} message, got {cls.__name__}.")
    kwargs = dict(header["fields"])
    extra = {k.removeprefix("tensors."): v for k, v in raw.items() if k.startswith("tensors.")}
    if "tensors" in {f.name for f in fields(cls)}:
        kwargs["tensors"] = extra
    for name in _TENSOR_FIELDS & {f.name for f in fields(cls)}:
        if name not in raw:
            raise MessageError(f"{cls.__name__} payload lacks its {name!r} tensor.")
        kwargs[name] = raw[name]
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MessageError(f"{cls.__name__} payload has wrong fields: {exc}") from exc


# Config keys of a fit task that switch on differential privacy on the client.
DP_CLIP_NORM = "dp_clip_norm"  # central DP: clip the update to this L2 norm before it leaves
DP_SGD_NOISE = "dp_sgd_noise_multiplier"  # local DP: train with DP-SGD at this noise multiplier
DP_SGD_CLIP = "dp_sgd_max_grad_norm"  # ... clipping each per-sample gradient to this norm
