"""The seam between the round driver and where clients run.

A transport sends encoded messages to clients and returns what comes back before the deadline.
The in-process simulator, Ray and gRPC implement it; the round driver is written once against it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass


class FailureKind(enum.StrEnum):
    ERROR = "error"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Delivered:
    """A client's reply payload and the seconds it took."""

    client_id: int
    payload: bytes
    seconds: float


@dataclass(frozen=True)
class Failed:
    """A client that did not reply in time or raised; ``reason`` is for the log."""

    client_id: int
    kind: FailureKind
    reason: str


Outcome = Delivered | Failed


class LazyRequests(Mapping[int, bytes]):
    """One exchange's requests, each encoded only when the transport reads it.

    Encoding every request up front would hold one encoded model per sampled client for the
    whole round (49 MiB for 100 clients of a 120k-parameter model), and in the in-process
    simulator that memory sits beside the training step's buffers (and is faulted in afresh each
    round). A transport that sends as it reads (the simulator does) keeps just the one payload in
    flight; one that reads all first gets them all. Reading a request twice encodes it twice;
    the bytes are the same.
    """

    def __init__(self, client_ids: Sequence[int], encode: Callable[[int], bytes]) -> None:
        self._ids = {cid: None for cid in client_ids}
        self._encode = encode
        self._sizes: dict[int, int] = {}

    def __getitem__(self, client_id: int) -> bytes:
        if client_id not in self._ids:
            raise KeyError(client_id)
        payload = self._encode(client_id)
        self._sizes[client_id] = len(payload)
        return payload

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def bytes_sent(self) -> int:
        """Total size of the requests read so far (each client counted once)."""
        return sum(self._sizes.values())


class Transport(abc.ABC):
    """Deliver one request per client and gather the outcomes."""

    @property
    @abc.abstractmethod
    def client_ids(self) -> Sequence[int]:
        """The clients this transport can reach."""

    @abc.abstractmethod
    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        """Send ``requests`` (client id to payload); return one outcome per request, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release connections or workers."""
