"""Payloads on the wire: split into 1 MiB chunks, reassembled with a size limit and a SHA-256.

gRPC refuses single messages above its receive limit (4 MiB by default), and a model can be
hundreds of megabytes, so every payload travels as a stream of chunks. The first chunk carries
the payload's total size and SHA-256; the receiver refuses a declared size above its limit
before reading any data, refuses more data than declared, and refuses a payload whose digest
differs. Errors carry the gRPC status code the receiver answers with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

CHUNK_BYTES = 1 << 20
# One chunk plus its envelope (credentials, header) must fit gRPC's per-message limit.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
SHA256_BYTES = 32


class WireError(Exception):
    """A payload or envelope refused; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Header:
    """The first chunk's description of a payload."""

    task_id: str
    size: int
    sha256: bytes


def header_of(task_id: str, payload: bytes) -> Header:
    """The header announcing ``payload`` for ``task_id``."""
    return Header(task_id, len(payload), hashlib.sha256(payload).digest())


def pieces(payload: bytes) -> Iterator[memoryview]:
    """``payload`` in slices of at most :data:`CHUNK_BYTES` (one empty slice for an empty one)."""
    view = memoryview(payload)
    if not view:
        yield view
        return
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES]


class Assembler:
    """Collects the chunks of one payload announced by ``header``."""

    def __init__(self, header: Header, *, max_bytes: int) -> None:
        if header.size > max_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"payload of {header.size} bytes exceeds the limit of {max_bytes} bytes",
            )
        if len(header.sha256) != SHA256_BYTES:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"payload header has a {len(header.sha256)}-byte digest, expected {SHA256_BYTES}",
            )
        self.header = header
        self._buffer = bytearray()

    def add(self, data: bytes) -> None:
        if len(data) > CHUNK_BYTES:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk of {len(data)} bytes exceeds {CHUNK_BYTES} bytes",
            )
        if len(self._buffer) + len(data) > self.header.size:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"more data than the declared {self.header.size} bytes",
            )
        self._buffer += data

    def finish(self) -> bytes:
        if len(self._buffer) != self.header.size:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"payload ended at {len(self._buffer)} of the declared {self.header.size} bytes",
            )
        if hashlib.sha256(self._buffer).digest() != self.header.sha256:
            raise WireError(grpc.StatusCode.DATA_LOSS, "payload SHA-256 does not match its header")
        return bytes(self._buffer)
