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


class Population(Transport):
    """``transport`` restricted to the clients ``client_ids`` (the registered ones): the round
    driver samples from them; requests pass through unchanged."""

    def __init__(self, transport: Transport, client_ids: Sequence[int]) -> None:
        unknown = sorted(set(client_ids) - set(transport.client_ids))
        if unknown:
            raise ValueError(f"Clients {unknown} are not reachable over this transport.")
        self.inner = transport
        self._client_ids = tuple(client_ids)

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        return self.inner.exchange(requests, deadline_s=deadline_s)

    def close(self) -> None:
        self.inner.close()
