"""The messages of a round and their wire encoding.

A message is a frozen dataclass of scalars plus named tensors. On the wire it is one safetensors
blob whose metadata holds the scalars as JSON, so the in-process transport, Ray and gRPC carry
exactly the same bytes, and tests of the simulator exercise the real encoding. Model tensors
(``parameters``, ``update``) travel as ``float32``; the masked vector of secure aggregation keeps
its integer dtype; byte strings (keys, ciphertexts) travel as ``uint8`` tensors, and a mapping
from client id to byte string as one concatenated ``uint8`` tensor with the ids and lengths in
the metadata.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

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


ByteMap = dict[int, bytes]


@dataclass(frozen=True)
class SecAggSetup:
    """Secure aggregation, phase 0 (advertise keys), server to client: the round's public setup.

    ``sampled`` are the clients of the round (the share points are their positions plus one),
    ``graph_seed`` and ``neighbours`` fix the masking graph, ``threshold`` the Shamir threshold
    per neighbourhood; ``bits``, ``clip_norm``, ``max_weight``, ``weighted`` and ``dim`` fix the
    fixed-point encoding (see :mod:`fedguard.algorithms.secagg_quantize`).
    """

    round: int
    client_id: int
    sampled: list[int]
    neighbours: int
    threshold: int
    graph_seed: int
    bits: int
    clip_norm: float
    max_weight: int
    weighted: bool
    dim: int


@dataclass(frozen=True)
class SecAggKeys:
    """Phase 0 reply: the client's two X25519 public keys, signed if it has an identity."""

    round: int
    client_id: int
    c_public: bytes
    s_public: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class SecAggShareRequest:
    """Phase 1 (share keys), server to client: the public keys (``c || s``) of its neighbours."""

    round: int
    client_id: int
    public_keys: ByteMap
    signatures: ByteMap = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggShares:
    """Phase 1 reply: one encrypted share bundle per receiving neighbour (receiver id to bytes)."""

    round: int
    client_id: int
    ciphertexts: ByteMap


@dataclass(frozen=True)
class SecAggMaskRequest:
    """Phase 2 (masked input), server to client: the fit task and the bundles addressed to it."""

    round: int
    client_id: int
    parameters: torch.Tensor
    ciphertexts: ByteMap
    config: dict[str, Scalar] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggMaskedInput:
    """Phase 2 reply: the masked encoding ``y_u`` (ring elements as int32 or int64 bits)."""

    round: int
    client_id: int
    masked: torch.Tensor


@dataclass(frozen=True)
class SecAggUnmaskRequest:
    """Phase 3 (unmasking), server to client: who sent a masked input and who did not."""

    round: int
    client_id: int
    alive: list[int]
    dropped: list[int]


@dataclass(frozen=True)
class SecAggUnmaskReply:
    """Phase 3 reply: shares of ``b_v`` for alive peers and of ``s_v^SK`` for dropped ones."""

    round: int
    client_id: int
    b_shares: ByteMap
    s_shares: ByteMap


SecAggMessage = (
    SecAggSetup
    | SecAggKeys
    | SecAggShareRequest
    | SecAggShares
    | SecAggMaskRequest
    | SecAggMaskedInput
    | SecAggUnmaskRequest
    | SecAggUnmaskReply
)
Message = FitTask | FitReply | EvaluateTask | EvaluateReply | SecAggMessage
_KINDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        FitTask,
        FitReply,
        EvaluateTask,
        EvaluateReply,
        SecAggSetup,
        SecAggKeys,
        SecAggShareRequest,
        SecAggShares,
        SecAggMaskRequest,
        SecAggMaskedInput,
        SecAggUnmaskRequest,
        SecAggUnmaskReply,
    )
}
_TENSOR_FIELDS = {"parameters", "update"}  # float32 on the wire
_RING_FIELDS = {"masked"}  # integer tensors, sent with their dtype
_BYTES_FIELDS = {"c_public", "s_public", "signature"}
_BYTE_MAP_FIELDS = {"public_keys", "signatures", "ciphertexts", "b_shares", "s_shares"}


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as the contiguous CPU array the codec writes (numpy has no bfloat16: float32)."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.numpy())


@dataclass(frozen=True)
class Header:
    """What an encoded payload says about itself before any tensor is read: its kind, its
    scalar fields, its byte-map layouts and the shape of each tensor."""

    kind: str
    fields: dict[str, Any]
    maps: dict[str, list[list[int]]]
    shapes: dict[str, tuple[int, ...]]


def read_header(payload: bytes) -> Header:
    """The :class:`Header` of a payload made by :func:`encode`, without copying its tensors."""
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        table = json.loads(payload[8 : 8 + header_len])
        head = json.loads(table["__metadata__"]["message"])
        shapes = {
            name: tuple(entry["shape"]) for name, entry in table.items() if name != "__metadata__"
        }
        return Header(str(head["kind"]), dict(head["fields"]), head.get("maps", {}), shapes)
    except Exception as exc:  # any malformed payload is one kind of error for the caller
        raise MessageError(f"Malformed message payload: {exc}") from exc


def kind_of(payload: bytes) -> str:
    """The message kind (class name) of an encoded payload, read from its header only."""
    return read_header(payload).kind


def addressing_problem(reply: Message, client_id: int, round_: int) -> str | None:
    """Why ``reply`` is not from ``client_id`` for ``round_``, or None if it is."""
    if reply.client_id == client_id and reply.round == round_:
        return None
    return (
        f"reply is for client {reply.client_id} round {reply.round}, "
        f"expected client {client_id} round {round_}"
    )


def encode(message: Message) -> bytes:
    """Serialise a message to bytes (safetensors with the scalar fields as JSON metadata).

    Through safetensors' numpy half, whose per-message cost is a sixth of the torch half's: it
    matters for the small key and share messages of secure aggregation, several per client.
    """
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    maps: dict[str, list[list[int]]] = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in _TENSOR_FIELDS:
            tensors[f.name] = _array(value.to(torch.float32))
        elif f.name in _RING_FIELDS:
            tensors[f.name] = _array(value)
        elif f.name in _BYTES_FIELDS:
            tensors[f"bytes.{f.name}"] = _bytes_array(value)
        elif f.name in _BYTE_MAP_FIELDS:
            ids = sorted(value)
            maps[f.name] = [[int(i), len(value[i])] for i in ids]
            tensors[f"map.{f.name}"] = _bytes_array(b"".join(value[i] for i in ids))
        elif f.name == "tensors":
            for key, t in value.items():
                tensors[f"tensors.{key}"] = _array(t)
        else:
            scalars[f.name] = value
    head: dict[str, Any] = {"kind": type(message).__name__, "fields": scalars}
    if maps:
        head["maps"] = maps
    header = json.dumps(head)
    return _st_save(tensors, metadata={"message": header})


def decode(payload: bytes, expected: type | None = None) -> Message:
    """Parse bytes made by :func:`encode`; ``expected`` checks the message kind."""
    header = read_header(payload)
    try:
        cls = _KINDS[header.kind]
        raw = _st_load(payload)
    except Exception as exc:  # any malformed payload is one kind of error for the caller
        raise MessageError(f"Malformed message payload: {exc}") from exc
    if expected is not None and cls is not expected:
        raise MessageError(f"Expected a {expected.__name__} message, got {cls.__name__}.")
    kwargs = dict(header.fields)
    extra = {
        k.removeprefix("tensors."): torch.from_numpy(v)
        for k, v in raw.items()
        if k.startswith("tensors.")
    }
    if "tensors" in {f.name for f in fields(cls)}:
        kwargs["tensors"] = extra
    names = {f.name for f in fields(cls)}
    for name in (_TENSOR_FIELDS | _RING_FIELDS) & names:
        if name not in raw:
            raise MessageError(f"{cls.__name__} payload lacks its {name!r} tensor.")
        kwargs[name] = torch.from_numpy(raw[name])
    try:
        for name in _BYTES_FIELDS & names:
            kwargs[name] = raw[f"bytes.{name}"].tobytes()
        for name in _BYTE_MAP_FIELDS & names:
            kwargs[name] = _byte_map(raw[f"map.{name}"], header.maps[name])
    except (KeyError, ValueError) as exc:
        raise MessageError(f"{cls.__name__} payload lacks or garbles a byte field: {exc}") from exc
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MessageError(f"{cls.__name__} payload has wrong fields: {exc}") from exc


def _byte_map(blob: np.ndarray, layout: list[list[int]]) -> ByteMap:
    data = blob.tobytes()
    if sum(length for _, length in layout) != len(data):
        raise ValueError("the byte map's lengths do not add up to its data")
    out: ByteMap = {}
    offset = 0
    for client_id, length in layout:
        out[int(client_id)] = data[offset : offset + length]
        offset += length
    return out


# Config keys of a fit task that switch on differential privacy on the client.
DP_CLIP_NORM = "dp_clip_norm"  # central DP: clip the update to this L2 norm before it leaves
DP_SGD_NOISE = "dp_sgd_noise_multiplier"  # local DP: train with DP-SGD at this noise multiplier
DP_SGD_CLIP = "dp_sgd_max_grad_norm"  # ... clipping each per-sample gradient to this norm
