"""The seam between the round driver and where clients run.

A transport sends encoded messages to clients and returns what comes back before the deadline.
The in-process simulator, Ray and gRPC implement it; the round driver is written once against it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
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
