"""The messages of a round and their wire encoding.

A message is a frozen dataclass of scalars plus named tensors. On the wire it is one safetensors
blob whose metadata holds the scalars as JSON, so the in-process transport, Ray and gRPC carry
exactly the same bytes, and tests of the simulator exercise the real encoding. Model tensors
(``parameters``, ``update``) travel as ``float32``; the masked vector of secure aggregation keeps
its integer dtype; byte strings (keys, ciphertexts) travel as ``uint8`` tensors, a list of
client ids (the sampled, alive, dropped and surviving clients) as one ``int64`` tensor
(``ids.<name>``), and a mapping from client id to byte string as one concatenated ``uint8``
tensor (``map.<name>``) beside two ``int64`` tensors of its ids in increasing order and their
lengths (``map_ids.<name>``, ``map_lengths.<name>``): a message with an entry per client of a
round of a thousand is read and checked in a few vectorised steps instead of a JSON list of a
thousand entries, and decoded byte maps stay packed (:class:`PackedByteMap`).

Every payload is checked against its kind's schema before a message is built (:func:`decode`):
the scalar fields have the types and ranges of :data:`SCHEMA` (pydantic models in strict mode:
no string for a number, no float for a count, no field the kind does not declare), id lists hold
distinct valid client ids, a byte map's ids are distinct valid client ids in increasing order and
its lengths add up to its data, and each tensor has the name, dtype and rank its kind expects.
Any violation is a :class:`MessageError`, so a peer's reply of the wrong shape is
one kind of error for the receiver, never a ``TypeError`` deep inside a round.

Every header carries the :data:`WIRE_FORMAT` its writer speaks. A payload of another format (a
server and clients of different fedguard versions) is refused with both formats named, before its
fields are read: a changed layout is never misread as a malformed message of the current one.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal, TypeAlias, TypeVar, overload

import numpy as np
import pydantic
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

Scalar = bool | int | float | str | None

# The layout of the encoding. Raise it whenever a kind's fields or tensors change meaning.
# 1: byte maps and id lists as JSON lists of the scalars (headers without "format").
# 2: byte maps packed into uint8 data with int64 id and length tensors; id lists as int64 tensors.
WIRE_FORMAT = 2


def printable(text: str, limit: int = 500) -> str:
    """``text`` safe for one log line: control and other non-printable characters escaped
    (a newline becomes ``\\n``), cut to ``limit`` characters with the original length noted."""
    cut = text[:limit]
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return out if len(text) <= limit else f"{out}... ({len(text)} characters)"


class MessageError(ValueError):
    """A payload that cannot be decoded into a message of the expected kind.

    The reason is made :func:`printable`: it may quote what a peer sent, and it is logged.
    """

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


def config_float(config: Mapping[str, Scalar], key: str, default: float | None = None) -> float:
    """``config[key]`` as a float (an integer is read as one), ``default`` when it is absent.

    Raises :class:`MessageError` when the entry is absent without a default, or is not a number
    (a bool, a string or None).
    """
    value = config.get(key, default)
    if value is None and key not in config:
        raise MessageError(f"The config lacks {key!r}.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"The config entry {key!r} must be a number, not {value!r}.")
    return float(value)


def config_int(config: Mapping[str, Scalar], key: str, default: int | None = None) -> int:
    """``config[key]`` as an integer, ``default`` when it is absent.

    Raises :class:`MessageError` when the entry is absent without a default, or is not an integer
    (a bool, a float, a string or None).
    """
    value = config.get(key, default)
    if value is None and key not in config:
        raise MessageError(f"The config lacks {key!r}.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"The config entry {key!r} must be an integer, not {value!r}.")
    return value


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
    """Client to server: evaluation metrics on ``num_examples`` local held-out examples, and
    the counts a federated report adds up (``tensors``: the :data:`EVAL_SCORES` histograms and
    the :data:`EVAL_CONFUSION` matrix, when the task asks for them)."""

    round: int
    client_id: int
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisterTask:
    """Server to client, before round 1: say what the server needs of you (round 0).

    ``config`` holds the server's :data:`REGISTER_SIGNATURE` (its model's signature, which the
    client compares with its own) and :data:`REGISTER_BUCKET` (the coarsest rounding of example
    counts the server accepts without asking for more)."""

    round: int
    client_id: int
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    """Client to server: what a server without the data needs of this client.

    ``num_examples`` and ``eval_examples`` are the client's training and held-out example
    counts, each rounded up to a multiple of ``count_bucket`` (1: exact); ``model_signature`` is
    the hash of its model's parameter names, shapes and dtypes
    (:func:`fedguard.protocol.registration.model_signature`)."""

    round: int
    client_id: int
    num_examples: int
    eval_examples: int
    count_bucket: int
    model_signature: str


ByteMap = Mapping[int, bytes]


class PackedByteMap(Mapping[int, bytes]):
    """A byte map kept as its wire form: ids in increasing order, their lengths and one bytes
    object, each entry cut out only when it is read.

    :func:`decode` returns byte maps in this form and :func:`encode` writes one without a
    per-entry step, so a map that a server sends to every client of a round (every signed
    advertisement, every reveal, every consistency signature) is packed once and read in a few
    vectorised steps, not a thousand dictionary entries per message. ``digest`` identifies the
    contents (see :func:`map_digest`).
    """

    __slots__ = ("_data", "_digest", "_ids", "_index", "_lengths")

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, data: bytes) -> None:
        """``ids`` strictly increasing and ``lengths`` adding up to ``len(data)`` (int64 vectors
        of one size): the caller has checked them (:func:`decode`) or made them
        (:meth:`pack`)."""
        self._ids = ids
        self._lengths = lengths
        self._data = data
        self._index: dict[int, tuple[int, int]] | None = None  # id -> (start, end), on demand
        self._digest: bytes | None = None

    @classmethod
    def pack(cls, byte_map: Mapping[int, bytes]) -> PackedByteMap:
        """``byte_map`` packed (itself if it is packed already)."""
        if isinstance(byte_map, PackedByteMap):
            return byte_map
        ids = sorted(byte_map)
        values = [byte_map[i] for i in ids]
        return cls(
            np.array(ids, dtype=np.int64),
            np.fromiter(map(len, values), dtype=np.int64, count=len(values)),
            b"".join(values),
        )

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def data(self) -> bytes:
        return self._data

    def digest(self) -> bytes:
        """SHA-256 of the ids, the lengths (little-endian int64) and the data: equal digests,
        equal maps."""
        if self._digest is None:
            h = hashlib.sha256(self._ids.astype("<i8").tobytes())
            h.update(self._lengths.astype("<i8").tobytes())
            h.update(self._data)
            self._digest = h.digest()
        return self._digest

    def _position(self) -> dict[int, tuple[int, int]]:
        if self._index is None:
            ends = np.cumsum(self._lengths)
            bounds = zip((ends - self._lengths).tolist(), ends.tolist(), strict=True)
            self._index = dict(zip(self._ids.tolist(), bounds, strict=True))
        return self._index

    def __getitem__(self, key: int) -> bytes:
        start, end = self._position()[key]
        return self._data[start:end]

    def __contains__(self, key: object) -> bool:
        return key in self._position()

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids.tolist())

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"PackedByteMap({dict(self.items())!r})"


def map_digest(byte_map: Mapping[int, bytes]) -> bytes:
    """The :meth:`PackedByteMap.digest` of any byte map."""
    return PackedByteMap.pack(byte_map).digest()


@dataclass(frozen=True)
class SecAggSetup:
    """Secure aggregation, phase 0 (advertise keys), server to client: the round's public setup.

    ``sampled`` are the clients of the round (the share points are their positions plus one),
    ``graph_seed`` and ``neighbours`` fix the masking graph, ``threshold`` the Shamir threshold
    per neighbourhood; ``bits``, ``clip_norm``, ``max_weight``, ``weighted`` and ``dim`` fix the
    fixed-point encoding (see :mod:`fedguard.algorithms.secagg.quantize`). ``verified`` announces
    the protocol that is secure against a malicious server (signed keys, a consistency check
    and, in SecAgg+, a graph from the clients' committed randomness instead of ``graph_seed``),
    and ``nonce`` is that round's fresh 32-byte nonce, bound into every signed payload.
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
    verified: bool = False
    nonce: bytes = b""


@dataclass(frozen=True)
class SecAggKeys:
    """Phase 0 reply: the client's two X25519 public keys, signed if it has an identity, and in
    a verified SecAgg+ round its commitment ``H(r)`` to its share of the graph's randomness
    (inside the signed payload)."""

    round: int
    client_id: int
    c_public: bytes
    s_public: bytes
    signature: bytes = b""
    commitment: bytes = b""


@dataclass(frozen=True)
class SecAggRevealRequest:
    """Verified SecAgg+ only, between phases 0 and 1, server to client: every advertisement the
    server holds (``c || s || commitment`` per client) with its signature. A client that has
    checked them reveals its ``r``: the commitments are fixed before any ``r`` is known."""

    round: int
    client_id: int
    advertised: ByteMap
    signatures: ByteMap


@dataclass(frozen=True)
class SecAggReveal:
    """Reply to :class:`SecAggRevealRequest`: the client's 32-byte ``r``."""

    round: int
    client_id: int
    reveal: bytes


@dataclass(frozen=True)
class SecAggShareRequest:
    """Phase 1 (share keys), server to client: the public keys (``c || s``) of its neighbours,
    their signatures and, in a verified SecAgg+ round, the ``r`` of every client that revealed
    (the graph seed is their hash)."""

    round: int
    client_id: int
    public_keys: ByteMap
    signatures: ByteMap = field(default_factory=dict)
    reveals: ByteMap = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggShares:
    """Phase 1 reply: one encrypted share bundle per receiving neighbour (receiver id to bytes)
    and, in a verified round, a commitment to each holder's share bundle (the client's own
    included), which lets the server discard a forged share in phase 3."""

    round: int
    client_id: int
    ciphertexts: ByteMap
    commitments: ByteMap = field(default_factory=dict)


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
class SecAggConsistencyRequest:
    """Consistency check (verified rounds, between phases 2 and 3), server to client: the set
    ``U3`` of clients whose masked inputs the server holds."""

    round: int
    client_id: int
    survivors: list[int]


@dataclass(frozen=True)
class SecAggConsistencySignature:
    """Reply to :class:`SecAggConsistencyRequest`: the client's signature over the round and
    the survivor set it was sent."""

    round: int
    client_id: int
    signature: bytes


@dataclass(frozen=True)
class SecAggUnmaskRequest:
    """Phase 3 (unmasking), server to client: who sent a masked input and who did not and, in a
    verified round, the survivors' consistency signatures over that survivor set."""

    round: int
    client_id: int
    alive: list[int]
    dropped: list[int]
    signatures: ByteMap = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggUnmaskReply:
    """Phase 3 reply: shares of ``b_v`` for alive peers and of ``s_v^SK`` for dropped ones."""

    round: int
    client_id: int
    b_shares: ByteMap
    s_shares: ByteMap


@dataclass(frozen=True)
class HeEncryptRequest:
    """Homomorphic-encryption round, server to client: the fit task and the round's public
    encoding. The client trains, encodes its clipped update for a sum of ``cohort`` clients
    (``bits``, ``clip_norm``, ``max_weight``, ``weighted``; see
    :mod:`fedguard.protocol.he`), encrypts it under the federation's key with ``scheme`` and,
    with an identity, signs the ciphertexts' digest bound to ``nonce``."""

    round: int
    client_id: int
    parameters: torch.Tensor
    scheme: str
    bits: int
    clip_norm: float
    max_weight: int
    weighted: bool
    cohort: int
    nonce: bytes = b""
    config: dict[str, Scalar] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class HeEncrypted:
    """Reply to :class:`HeEncryptRequest`: the encrypted encoding, one serialised ciphertext
    per block of slots (keyed 0, 1, ...), and the client's signature over their digest (empty
    without an identity)."""

    round: int
    client_id: int
    ciphertexts: ByteMap
    signature: bytes = b""


@dataclass(frozen=True)
class HeDecryptRequest:
    """Server to a key-holding client: decrypt the homomorphic sum (keyed 0, 1, ...) of the
    encrypted updates of ``survivors`` (``scheme``, ``dim``: what it must decrypt to);
    ``digest_only``: send only the SHA-256 digest of the plaintext (a second decryptor, whose
    answer is compared with the first's)."""

    round: int
    client_id: int
    ciphertexts: ByteMap
    survivors: list[int]
    scheme: str
    dim: int
    digest_only: bool = False


@dataclass(frozen=True)
class HeDecrypted:
    """Reply to :class:`HeDecryptRequest`: the plaintext sum (BFV: its residues modulo
    ``2^bits``, int32 when ``bits <= 32``, else int64; CKKS: float64; see
    :func:`fedguard.protocol.he.wire_plain`), or for a digest-only request an empty ``plain``
    and the plaintext's :func:`fedguard.protocol.he.plain_digest`."""

    round: int
    client_id: int
    plain: torch.Tensor
    digest: bytes = b""  # a digest-only request's answer (then ``plain`` is empty)


HeMessage = HeEncryptRequest | HeEncrypted | HeDecryptRequest | HeDecrypted


SecAggMessage = (
    SecAggSetup
    | SecAggKeys
    | SecAggRevealRequest
    | SecAggReveal
    | SecAggShareRequest
    | SecAggShares
    | SecAggMaskRequest
    | SecAggMaskedInput
    | SecAggConsistencyRequest
    | SecAggConsistencySignature
    | SecAggUnmaskRequest
    | SecAggUnmaskReply
)
Message = (
    FitTask
    | FitReply
    | EvaluateTask
    | EvaluateReply
    | RegisterTask
    | Registration
    | SecAggMessage
    | HeMessage
)
_KINDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        FitTask,
        FitReply,
        EvaluateTask,
        EvaluateReply,
        RegisterTask,
        Registration,
        SecAggSetup,
        SecAggKeys,
        SecAggRevealRequest,
        SecAggReveal,
        SecAggShareRequest,
        SecAggShares,
        SecAggMaskRequest,
        SecAggMaskedInput,
        SecAggConsistencyRequest,
        SecAggConsistencySignature,
        SecAggUnmaskRequest,
        SecAggUnmaskReply,
        HeEncryptRequest,
        HeEncrypted,
        HeDecryptRequest,
        HeDecrypted,
    )
}
_TENSOR_FIELDS = {"parameters", "update"}  # float32 on the wire
_RING_FIELDS = {
    "masked",
    "plain",
}  # integer (or a CKKS sum's float64) tensors, sent with their dtype
_BYTES_FIELDS = {"c_public", "s_public", "signature", "nonce", "commitment", "reveal", "digest"}
_ID_LIST_FIELDS = {"sampled", "alive", "dropped", "survivors"}  # distinct client ids, as int64
_BYTE_MAP_FIELDS = {
    "public_keys",
    "signatures",
    "ciphertexts",
    "b_shares",
    "s_shares",
    "advertised",
    "reveals",
    "commitments",
}


# -- the schema ---------------------------------------------------------------------------------
MAX_ROUND = 2**31 - 1
MAX_CLIENT_ID = 2**31 - 1
MAX_CLIENTS = 1 << 20  # entries of a client list or a byte map
MAX_EXAMPLES = 2**40  # a client's example count (exact in float64 and in any weight sum)
MAX_ENTRIES = 256  # metrics, config keys, extra tensors
MAX_NAME = 128  # characters of a metric, config or tensor name
MAX_TEXT = 4096  # characters of a string config value
MAX_DIM = 2**40


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


def _within(lo: int, hi: int) -> Any:
    """The metadata of a strict integer field in ``[lo, hi]``: ``Annotated[int, _within(lo, hi)]``."""
    return Field(strict=True, ge=lo, le=hi)


_Round: TypeAlias = Annotated[int, _within(0, MAX_ROUND)]
_ClientId: TypeAlias = Annotated[int, _within(0, MAX_CLIENT_ID)]
_Count: TypeAlias = Annotated[int, _within(0, MAX_EXAMPLES)]
_Name: TypeAlias = Annotated[str, StringConstraints(strict=True, max_length=MAX_NAME)]
# NaN is how a client says "not measured" (a DP-SGD client whose batches were all empty);
# the driver decides what a non-finite metric means. Integers are read as floats.
_Metrics: TypeAlias = Annotated[
    dict[_Name, Annotated[float, Field(strict=True)]], Field(strict=True, max_length=MAX_ENTRIES)
]
_ConfigValue: TypeAlias = (
    Annotated[bool, Field(strict=True)]
    | Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(strict=True)]
    | Annotated[str, StringConstraints(strict=True, max_length=MAX_TEXT)]
    | None
)
_Config: TypeAlias = Annotated[
    dict[_Name, _ConfigValue], Field(strict=True, max_length=MAX_ENTRIES)
]


class _Fields(BaseModel):
    """The JSON scalars of a message: exactly these names, of exactly these types."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    round: _Round
    client_id: _ClientId


class _TaskFields(_Fields):
    config: _Config = {}


class _ReplyFields(_Fields):
    num_examples: _Count
    metrics: _Metrics = {}


class _SetupFields(_Fields):
    neighbours: Annotated[int, _within(0, MAX_CLIENTS)]
    threshold: Annotated[int, _within(1, MAX_CLIENTS)]
    graph_seed: Annotated[int, _within(0, 2**63 - 1)]
    bits: Annotated[int, _within(1, 64)]
    clip_norm: Annotated[float, Field(strict=True, gt=0), AfterValidator(_finite)]
    max_weight: Annotated[int, _within(1, MAX_EXAMPLES)]
    weighted: Annotated[bool, Field(strict=True)]
    dim: Annotated[int, _within(1, MAX_DIM)]
    verified: Annotated[bool, Field(strict=True)] = False


class _HeTaskFields(_TaskFields):
    scheme: Literal["bfv", "ckks"]
    bits: Annotated[int, _within(1, 64)]
    clip_norm: Annotated[float, Field(strict=True, gt=0), AfterValidator(_finite)]
    max_weight: Annotated[int, _within(1, MAX_EXAMPLES)]
    weighted: Annotated[bool, Field(strict=True)]
    cohort: Annotated[int, _within(1, MAX_CLIENTS)]


class _HeDecryptFields(_Fields):
    scheme: Literal["bfv", "ckks"]
    dim: Annotated[int, _within(1, MAX_DIM)]
    digest_only: Annotated[bool, Field(strict=True)]


class _RegistrationFields(_Fields):
    num_examples: _Count
    eval_examples: _Count
    count_bucket: Annotated[int, _within(1, MAX_EXAMPLES)]
    model_signature: Annotated[str, StringConstraints(strict=True, max_length=MAX_NAME)]


@dataclass(frozen=True)
class _TensorSpec:
    """The safetensors dtypes a tensor may have, its rank (``None``: any) and, for a byte string
    of fixed size, the lengths it may have (``None``: any)."""

    dtypes: frozenset[str]
    rank: int | None = 1
    lengths: frozenset[int] | None = None


_FLOAT32 = _TensorSpec(frozenset({"F32"}))
_RING = _TensorSpec(frozenset({"I32", "I64"}))
_BYTES = _TensorSpec(frozenset({"U8"}))
NONCE_BYTES = 32  # a secure-aggregation round's nonce, a graph reveal, a commitment
SIGNATURE_BYTES = 64  # Ed25519
_DIGEST = _TensorSpec(frozenset({"U8"}), lengths=frozenset({NONCE_BYTES}))
_OPTIONAL_DIGEST = _TensorSpec(frozenset({"U8"}), lengths=frozenset({0, NONCE_BYTES}))
_SIGNATURE = _TensorSpec(frozenset({"U8"}), lengths=frozenset({0, SIGNATURE_BYTES}))
_IDS = _TensorSpec(frozenset({"I64"}))  # ``ids.<name>``: a list of distinct client ids
# ``map_ids.<name>`` and ``map_lengths.<name>``: the index of the byte map ``map.<name>``
_MAP_INDEX = _TensorSpec(frozenset({"I64"}))
_MAP_INDEX_PREFIXES = ("map_ids.", "map_lengths.")
# ``tensors.<name>``: any numeric dtype numpy and torch share, any shape
_EXTRA = _TensorSpec(
    frozenset({"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"}), rank=None
)

# Each kind's scalar fields (a pydantic model) and named tensors; ``tensors.<name>`` entries
# are allowed (as :data:`_EXTRA`) exactly for the kinds with a ``tensors`` field.
SCHEMA: dict[type, tuple[type[_Fields], dict[str, _TensorSpec]]] = {
    FitTask: (_TaskFields, {"parameters": _FLOAT32}),
    FitReply: (_ReplyFields, {"update": _FLOAT32}),
    EvaluateTask: (_TaskFields, {"parameters": _FLOAT32}),
    EvaluateReply: (_ReplyFields, {}),
    RegisterTask: (_TaskFields, {}),
    Registration: (_RegistrationFields, {}),
    SecAggSetup: (_SetupFields, {"ids.sampled": _IDS, "bytes.nonce": _OPTIONAL_DIGEST}),
    SecAggKeys: (
        _Fields,
        {
            "bytes.c_public": _BYTES,
            "bytes.s_public": _BYTES,
            "bytes.signature": _SIGNATURE,
            "bytes.commitment": _OPTIONAL_DIGEST,
        },
    ),
    SecAggRevealRequest: (_Fields, {"map.advertised": _BYTES, "map.signatures": _BYTES}),
    SecAggReveal: (_Fields, {"bytes.reveal": _DIGEST}),
    SecAggShareRequest: (
        _Fields,
        {"map.public_keys": _BYTES, "map.signatures": _BYTES, "map.reveals": _BYTES},
    ),
    SecAggShares: (_Fields, {"map.ciphertexts": _BYTES, "map.commitments": _BYTES}),
    SecAggMaskRequest: (
        _TaskFields,
        {"parameters": _FLOAT32, "map.ciphertexts": _BYTES},
    ),
    SecAggMaskedInput: (_Fields, {"masked": _RING}),
    SecAggConsistencyRequest: (_Fields, {"ids.survivors": _IDS}),
    SecAggConsistencySignature: (_Fields, {"bytes.signature": _SIGNATURE}),
    SecAggUnmaskRequest: (
        _Fields,
        {"ids.alive": _IDS, "ids.dropped": _IDS, "map.signatures": _BYTES},
    ),
    SecAggUnmaskReply: (_Fields, {"map.b_shares": _BYTES, "map.s_shares": _BYTES}),
    HeEncryptRequest: (
        _HeTaskFields,
        {"parameters": _FLOAT32, "bytes.nonce": _OPTIONAL_DIGEST},
    ),
    HeEncrypted: (_Fields, {"map.ciphertexts": _BYTES, "bytes.signature": _SIGNATURE}),
    HeDecryptRequest: (_HeDecryptFields, {"map.ciphertexts": _BYTES, "ids.survivors": _IDS}),
    HeDecrypted: (
        _Fields,
        {"plain": _TensorSpec(frozenset({"I32", "I64", "F64"})), "bytes.digest": _OPTIONAL_DIGEST},
    ),
}


def _validation_problem(exc: pydantic.ValidationError) -> str:
    """A pydantic error as one line: ``field: reason`` for each violation."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'fields'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    )


def _check_schema(cls: type, header: Header) -> dict[str, Any]:
    """The validated scalar fields of a ``cls`` payload; raises :class:`MessageError`."""
    model, specs = SCHEMA[cls]
    name = cls.__name__
    try:
        checked = model.model_validate(header.fields)
    except pydantic.ValidationError as exc:
        raise MessageError(f"{name} has invalid fields: {_validation_problem(exc)}") from None
    extras = "tensors" in {f.name for f in fields(cls)}
    for tensor in header.shapes:
        spec = specs.get(tensor)
        if spec is None and extras and tensor.startswith("tensors."):
            if len(tensor) - len("tensors.") > MAX_NAME:
                raise MessageError(f"{name} has a tensor name longer than {MAX_NAME}")
            spec = _EXTRA
        if spec is None and tensor.startswith(_MAP_INDEX_PREFIXES):
            if f"map.{tensor.partition('.')[2]}" in specs:
                spec = _MAP_INDEX
        if spec is None:
            raise MessageError(f"{name} has an unexpected tensor {tensor!r}")
        dtype, shape = header.dtypes.get(tensor), header.shapes[tensor]
        if dtype not in spec.dtypes:
            raise MessageError(
                f"{name} tensor {tensor!r} has dtype {dtype}, expected one of {sorted(spec.dtypes)}"
            )
        if spec.rank is not None and len(shape) != spec.rank:
            raise MessageError(f"{name} tensor {tensor!r} has shape {shape}, expected 1-D")
        if spec.lengths is not None and math.prod(shape) not in spec.lengths:
            raise MessageError(
                f"{name} tensor {tensor!r} has {math.prod(shape)} bytes, expected "
                f"{' or '.join(map(str, sorted(spec.lengths)))}"
            )
    if sum(t.startswith("tensors.") for t in header.shapes) > MAX_ENTRIES:
        raise MessageError(f"{name} has more than {MAX_ENTRIES} extra tensors")
    wanted = set(specs)
    for tensor in specs:
        if tensor.startswith("map."):
            wanted |= {prefix + tensor.removeprefix("map.") for prefix in _MAP_INDEX_PREFIXES}
    missing = sorted(wanted - set(header.shapes))
    if missing:
        raise MessageError(f"{name} payload lacks its {', '.join(map(repr, missing))} tensor")
    for tensor in specs:
        if tensor.startswith("map."):
            map_name = tensor.removeprefix("map.")
            entries = header.shapes[f"map_ids.{map_name}"]
            if header.shapes[f"map_lengths.{map_name}"] != entries or entries[0] > MAX_CLIENTS:
                raise MessageError(
                    f"{name} byte map {map_name!r} has {entries[0]} ids and "
                    f"{header.shapes[f'map_lengths.{map_name}'][0]} lengths (at most "
                    f"{MAX_CLIENTS} of each, as many of one as of the other)"
                )
    return {f: getattr(checked, f) for f in type(checked).model_fields}


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
    scalar fields and the shape of each tensor."""

    kind: str
    fields: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors' names: "F32", "U8"
    format: int = WIRE_FORMAT  # the writer's :data:`WIRE_FORMAT` (1 when the header has none)


def read_header(payload: bytes) -> Header:
    """The :class:`Header` of a payload made by :func:`encode`, without copying its tensors."""
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        table = json.loads(payload[8 : 8 + header_len])
        head = json.loads(table["__metadata__"]["message"])
        entries = {name: entry for name, entry in table.items() if name != "__metadata__"}
        shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in entries.items()}
        dtypes = {name: str(entry["dtype"]) for name, entry in entries.items()}
        fields_ = head["fields"]
        if not isinstance(fields_, dict):
            raise TypeError("the message's fields are not a JSON object")
        wire_format = head.get("format", 1)
        if isinstance(wire_format, bool) or not isinstance(wire_format, int):
            raise TypeError(f"the wire format is {wire_format!r}, not an integer")
        return Header(str(head["kind"]), fields_, shapes, dtypes, wire_format)
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
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in _TENSOR_FIELDS:
            tensors[f.name] = _array(value.to(torch.float32))
        elif f.name in _RING_FIELDS:
            tensors[f.name] = _array(value)
        elif f.name in _BYTES_FIELDS:
            tensors[f"bytes.{f.name}"] = _bytes_array(value)
        elif f.name in _ID_LIST_FIELDS:
            tensors[f"ids.{f.name}"] = np.array(value, dtype=np.int64).reshape(-1)
        elif f.name in _BYTE_MAP_FIELDS:
            packed = PackedByteMap.pack(value)
            tensors[f"map.{f.name}"] = _bytes_array(packed.data)
            tensors[f"map_ids.{f.name}"] = packed.ids
            tensors[f"map_lengths.{f.name}"] = packed.lengths
        elif f.name == "tensors":
            for key, t in value.items():
                tensors[f"tensors.{key}"] = _array(t)
        else:
            scalars[f.name] = value
    header = json.dumps({"kind": type(message).__name__, "format": WIRE_FORMAT, "fields": scalars})
    return _st_save(tensors, metadata={"message": header})


_M = TypeVar("_M", bound=Message)


@overload
def decode(payload: bytes, expected: type[_M]) -> _M: ...
@overload
def decode(payload: bytes, expected: None = None) -> Message: ...
def decode(payload: bytes, expected: type | None = None) -> Message:
    """Parse bytes made by :func:`encode`; ``expected`` checks the message kind (and types the
    result as that kind).

    The payload is checked against its kind's :data:`SCHEMA` (field types and ranges, tensor
    names, dtypes and ranks, byte-map indexes) before any tensor is read, and each byte map's
    ids and lengths after; any violation raises
    :class:`MessageError`.
    """
    header = read_header(payload)
    if header.format != WIRE_FORMAT:
        raise MessageError(
            f"A {header.kind} message in wire format {header.format}; this fedguard reads "
            f"format {WIRE_FORMAT}. The server and its clients must run fedguard versions of "
            "the same wire format."
        )
    cls = _KINDS.get(header.kind)
    if cls is None:
        raise MessageError(f"Unknown message kind {header.kind!r}.")
    if expected is not None and cls is not expected:
        raise MessageError(f"Expected a {expected.__name__} message, got {cls.__name__}.")
    kwargs = _check_schema(cls, header)
    try:
        raw = _st_load(payload)
    except Exception as exc:  # any malformed payload is one kind of error for the caller
        raise MessageError(f"Malformed message payload: {exc}") from exc
    names = {f.name for f in fields(cls)}
    if "tensors" in names:
        kwargs["tensors"] = {
            k.removeprefix("tensors."): torch.from_numpy(v)
            for k, v in raw.items()
            if k.startswith("tensors.")
        }
    for name in (_TENSOR_FIELDS | _RING_FIELDS) & names:
        kwargs[name] = torch.from_numpy(raw[name])
    for name in _BYTES_FIELDS & names:
        kwargs[name] = raw[f"bytes.{name}"].tobytes()
    for name in _ID_LIST_FIELDS & names:
        kwargs[name] = _id_list(f"{cls.__name__} {name!r}", raw[f"ids.{name}"])
    for name in _BYTE_MAP_FIELDS & names:
        kwargs[name] = _byte_map(
            f"{cls.__name__} byte map {name!r}",
            raw[f"map.{name}"],
            raw[f"map_ids.{name}"],
            raw[f"map_lengths.{name}"],
        )
    return cls(**kwargs)


def _id_list(what: str, ids: np.ndarray) -> list[int]:
    """A list of distinct client ids (an int64 vector, dtype and rank checked by the schema);
    raises :class:`MessageError` for an id out of range, a repeated one or too many."""
    if len(ids) > MAX_CLIENTS:
        raise MessageError(f"{what} lists {len(ids)} clients, more than {MAX_CLIENTS}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) > MAX_CLIENT_ID):
        raise MessageError(f"{what} has a client id outside [0, {MAX_CLIENT_ID}]")
    ordered = np.sort(ids)
    if len(ids) > 1 and not bool((ordered[1:] != ordered[:-1]).all()):
        raise MessageError(f"{what}: client ids must be distinct")
    return ids.tolist()


def _byte_map(what: str, blob: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> PackedByteMap:
    """The byte map of ``blob`` cut at ``lengths``, keyed by ``ids`` (their dtypes and equal
    sizes were checked by the schema); raises :class:`MessageError` unless the ids are valid
    client ids in increasing order (so distinct) and the lengths add up to the data."""
    if len(ids) and (int(ids[0]) < 0 or int(ids[-1]) > MAX_CLIENT_ID):
        raise MessageError(f"{what} has a client id outside [0, {MAX_CLIENT_ID}]")
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise MessageError(f"{what} repeats a client id or lists them out of order")
    if len(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > len(blob)):
        raise MessageError(f"{what} has a length outside [0, {len(blob)}]")
    if int(lengths.sum()) != len(blob):
        raise MessageError(f"{what}: lengths do not add up to its data")
    return PackedByteMap(ids, lengths, blob.tobytes())


# Config keys of a fit task that switch on differential privacy on the client.
DP_CLIP_NORM = "dp_clip_norm"  # central DP: clip the update to this L2 norm before it leaves
DP_UNCLIPPED = "dp_unclipped"  # central DP reply metric: the client's adaptive-clipping bit
DP_SGD_NOISE = "dp_sgd_noise_multiplier"  # local DP: train with DP-SGD at this noise multiplier
DP_SGD_CLIP = "dp_sgd_max_grad_norm"  # ... clipping each per-sample gradient to this norm

# Metrics of a fit reply under local DP: what the client's DP-SGD actually ran, so that the server
# composes it (the server's copy of a deployed client's data size is not its real one).
DP_SGD_RAN_RATE = "dp_sgd_sampling_rate"  # the Poisson sampling rate q of every step
DP_SGD_RAN_STEPS = "dp_sgd_steps"  # the DP-SGD steps taken in this round
DP_SGD_RAN_NOISE = "dp_sgd_ran_noise_multiplier"  # the noise multiplier of every step
DP_SGD_RAN_CLIP = "dp_sgd_ran_max_grad_norm"  # the per-example clip of every step
DP_SGD_REPORT = (DP_SGD_RAN_RATE, DP_SGD_RAN_STEPS, DP_SGD_RAN_NOISE, DP_SGD_RAN_CLIP)

# Config keys of an evaluation task: the bins of the score histograms and the classes the
# server's model has (the shapes of the reply's tensors); without them a client sends neither.
EVAL_BINS = "score_bins"
EVAL_CLASSES = "num_classes"
# Tensors of an evaluation reply: ``[C, 2, bins]`` int64 score histograms (see
# :mod:`fedguard.algorithms.binned_auc`) and the ``[C, C]`` int64 confusion matrix (true, predicted).
EVAL_SCORES = "score_histograms"
EVAL_CONFUSION = "confusion"
# Metric of an evaluation reply to a personal evaluation task (one naming a personalisation
# method): 1.0 when the client holds no held-out data of its own (none, or only its share of a
# central evaluation split); the reply carries nothing else and the server does not count it.
NO_OWN_EVAL = "no_own_held_out"

# Config keys of a registration task (see :class:`RegisterTask`).
REGISTER_SIGNATURE = "model_signature"
REGISTER_BUCKET = "count_bucket"
