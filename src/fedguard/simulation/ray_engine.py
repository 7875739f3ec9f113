"""The Ray engine: a simulated federation on a fixed pool of long-lived Ray actors.

Each actor is started once per run with the ids of the clients pinned to it (client ``k`` of the
sorted ids goes to actor ``k mod actors``) and a picklable *builder*, which it calls once to make
its client code (a :class:`~fedguard.client.app.ClientApp`): one model instance and the data of
its own clients, built inside the actor from the run's configuration and seed. No data crosses
the object store after that; each exchange sends every actor one remote call with the list of
``(client id, request bytes)`` of its clients, and the actor streams back ``(client id, reply
bytes)`` one client at a time (a Ray generator), so a deadline can tell the clients that replied
in time from those that did not. Requests and replies are the bytes of the wire encoding, as in
the in-process simulator.

Pinning keeps everything a client holds in the actor's memory within one round where it belongs
(a secure-aggregation client's keys and shares across the round's four exchanges). State that
must outlive a round (SCAFFOLD's control variate) lives in the runtime's state mapping on the
driver, as in the in-process simulator: it travels with the client's request to the actor and
back with its reply, so a replaced actor, or a checkpoint, sees exactly the state an
uninterrupted in-process run would. Clients without state (every built-in trainer except
SCAFFOLD's) send none.

Failures: a client that raises is an ``ERROR`` outcome; a client that has not replied when the
exchange's deadline passes is a ``TIMEOUT`` (its actor skips the clients it has not started by
then); an actor that dies (``RayActorError``: the process crashed, was killed or its node went
away) fails every client of its batch that had not replied, and is replaced by a fresh actor
holding the same clients before the exchange returns, so the next round has the full pool.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedguard.protocol.transport import Delivered, Failed, FailureKind, Outcome, Transport

log = logging.getLogger("fedguard.ray")

State = dict[str, torch.Tensor]
# The largest batch of request bytes one remote call carries; an actor with more waits for its
# previous batch to finish, so that the driver never holds more than this per actor. A batch is
# held three times while it runs (in the object store, and as the actor's copy of the requests
# and their decoded tasks), and the store keeps the pages of its high-water mark: with 64 MiB
# batches, 1,000 clients of a 0.5 MB model (W3 of benchmarks/scale.py) peaked 420 MiB higher
# (summed PSS) than with 8 MiB ones. The requests are encoded between calls either way, so
# smaller batches add only the calls themselves (some 60 a round there instead of 8).
MAX_BATCH_BYTES = 8 * 2**20
# How long a new actor may take to start (build its clients' data) before the pool gives up.
START_TIMEOUT_S = 600.0


class RayEngineError(RuntimeError):
    """The Ray pool cannot run: Ray is missing, the cluster is too small or an actor cannot start."""


class ClientCode(Protocol):
    """What an actor runs: the client function and the per-client state mapping it reads.

    Optional: an attribute ``batch`` holding a transport over the same clients that answers a
    whole batch at once (the cohort engine, ``runtime.actor_engine = "cohort"``)."""

    @property
    def state(self) -> MutableMapping[int, State]: ...

    def handle(self, client_id: int, payload: bytes) -> bytes: ...


# Called once inside each actor with the ids of its clients; returns their client code.
ClientBuilder = Callable[[Sequence[int]], ClientCode]


@dataclass(frozen=True)
class PoolSettings:
    """The pool's shape: ``actors`` (None: as many as the cluster has CPUs for, at most one per
    client), the CPUs and GPUs each reserves, and the cluster to join (``address``: None starts a
    local Ray instance unless this process already joined one; ``"auto"`` or ``HOST:PORT``)."""

    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayEngineError(
            "The Ray runtime needs the ray package: pip install 'fedguard[ray]'."
        ) from None
    return ray


@dataclass(frozen=True)
class _Item:
    """One client's outcome as an actor reports it (``reply`` None: ``error`` says why)."""

    client_id: int
    reply: bytes | None
    error: str | None
    timed_out: bool
    seconds: float
    state_changed: bool
    state: State | None


class ClientActor:
    """The body of one actor: its clients' code, built by :meth:`load`, and the batches it serves.

    An actor outlives one pool when its process joined Ray itself (see :meth:`RayTransport.close`):
    :meth:`unload` drops its clients and the next pool's :meth:`load` builds others.
    """

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.code: ClientCode | None = None

    def load(self, build: ClientBuilder, client_ids: Sequence[int]) -> tuple[str, int]:
        """Build the code of ``client_ids``; returns this actor's node and process."""
        import ray

        self.code = None  # the previous clients' data goes before the next is built
        self.code = build(client_ids)
        self.code.state.clear()
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def unload(self) -> None:
        self.code = None

    def serve(
        self, batch: Sequence[tuple[int, bytes, State | None]], deadline_at: float | None
    ) -> Iterator[_Item]:
        """Answer each ``(client id, request, state)`` in turn, yielding one item per client;
        a client not started by the wall-clock time ``deadline_at`` is skipped as timed out."""
        code = self.code
        if code is None:
            raise RayEngineError("This actor holds no clients (load was not called).")
        together: Transport | None = getattr(code, "batch", None)
        if together is not None:
            yield from self._serve_together(code, together, batch, deadline_at)
            return
        for client_id, payload, state in batch:
            if deadline_at is not None and time.time() > deadline_at:
                yield _Item(
                    client_id, None, "not started before the deadline", True, 0.0, False, None
                )
                continue
            if state is not None:
                code.state[client_id] = state
            start = time.perf_counter()
            reply, error = None, None
            try:
                reply = code.handle(client_id, payload)
            except Exception as exc:  # a client's failure must never stop the batch
                error = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
            after = code.state.pop(client_id, None)
            # The app assigns a client's entry whole whenever it changes (see ClientApp).
            yield _Item(client_id, reply, error, False, seconds, after is not state, after)

    @staticmethod
    def _serve_together(
        code: ClientCode,
        together: Transport,
        batch: Sequence[tuple[int, bytes, State | None]],
        deadline_at: float | None,
    ) -> Iterator[_Item]:
        """The whole batch through ``together`` (one exchange: the cohort engine trains its fit
        tasks as cohorts), then one item per client, in the batch's order."""
        before: dict[int, State | None] = {}
        for client_id, _, state in batch:
            before[client_id] = state
            if state is not None:
                code.state[client_id] = state
        remaining = None if deadline_at is None else max(0.0, deadline_at - time.time())
        outcomes = together.exchange(
            {cid: payload for cid, payload, _ in batch}, deadline_s=remaining
        )
        for outcome in outcomes:
            cid = outcome.client_id
            after = code.state.pop(cid, None)
            changed = after is not before[cid]
            if isinstance(outcome, Delivered):
                yield _Item(cid, outcome.payload, None, False, outcome.seconds, changed, after)
            else:
                timed_out = outcome.kind == FailureKind.TIMEOUT
                yield _Item(cid, None, outcome.reason, timed_out, 0.0, changed, after)


@dataclass
class _Slot:
    """One actor of the pool and the clients pinned to it."""

    index: int
    client_ids: tuple[int, ...]
    handle: Any = None
    node: str = ""


class RayTransport(Transport):
    """A :class:`Transport` over a pool of Ray actors (see the module docstring).

    ``build`` makes the client code inside each actor from the ids of its clients; it and
    everything it refers to must pickle. ``state`` is the runtime's per-client state mapping
    (shared with the checkpoint), read and written on this process only.
    """

    def __init__(
        self,
        build: ClientBuilder,
        client_ids: Sequence[int],
        state: MutableMapping[int, State],
        settings: PoolSettings = PoolSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ray = require_ray()
        if not client_ids:
            raise RayEngineError("The Ray runtime needs at least one client.")
        self._client_ids = tuple(client_ids)
        self._state = state
        self._clock = clock
        self.settings = settings
        self.replaced = 0  # actors replaced after dying, over the run
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(
                address="local" if settings.address is None else settings.address,
                include_dashboard=False,
                configure_logging=False,
            )
        elif settings.address is not None:
            log.info("Ray is already initialised in this process; runtime.address is not used")
        self._slots: list[_Slot] = []
        try:
            self._shape = (settings.cpus_per_actor, settings.gpus_per_actor, _session(ray))
            count = self._pool_size(ray)
            ordered = sorted(self._client_ids)
            self._slots = [_Slot(i, tuple(ordered[i::count])) for i in range(count)]
            self._slot_of = {cid: s.index for s in self._slots for cid in s.client_ids}
            self._build = ray.put(build)
            idle = _IDLE.pop(self._shape, [])
            for slot in self._slots:
                slot.handle = idle.pop() if idle else self._new_actor(ray)
            _kill(ray, idle)  # more than this pool needs
            self._load(ray, self._slots, retry=True)
        except BaseException:
            self.close()
            raise

    def _pool_size(self, ray: Any) -> int:
        s = self.settings
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        fits = math.floor(cpus / s.cpus_per_actor + 1e-9)
        if s.gpus_per_actor > 0:
            fits = min(fits, math.floor(gpus / s.gpus_per_actor + 1e-9))
        count = s.actors if s.actors is not None else min(fits, len(self._client_ids))
        if not 1 <= count <= fits:
            raise RayEngineError(
                f"runtime.actors = {count} actors of {s.cpus_per_actor:g} CPUs and "
                f"{s.gpus_per_actor:g} GPUs (runtime.cpus_per_actor, runtime.gpus_per_actor) do "
                f"not fit the Ray cluster's {cpus:g} CPUs and {gpus:g} GPUs: at most {fits}"
            )
        return int(count)

    def _new_actor(self, ray: Any) -> Any:
        s = self.settings
        remote = ray.remote(ClientActor).options(
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor
        )
        return remote.remote(max(1, math.floor(s.cpus_per_actor)))

    def _load(self, ray: Any, slots: Sequence[_Slot], *, retry: bool) -> None:
        """Have ``slots``' actors build their clients and wait for them; an actor that died
        meanwhile (a left-over one) is replaced once when ``retry``; a build error is raised."""
        refs = [s.handle.load.remote(self._build, list(s.client_ids)) for s in slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if len(ready) < len(refs):
            raise RayEngineError(
                f"{len(refs) - len(ready)} Ray actors did not start within {START_TIMEOUT_S:g} s "
                "(the cluster may lack the resources they ask for)"
            )
        gone = []
        for slot, ref in zip(slots, refs, strict=True):
            try:
                slot.node, _ = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if not retry:
                    raise RayEngineError(f"A Ray actor died while starting: {exc}") from None
                slot.handle = self._new_actor(ray)
                gone.append(slot)
            except ray.exceptions.RayError as exc:
                raise RayEngineError(f"A Ray actor failed to build its clients: {exc}") from None
        if gone:
            self._load(ray, gone, retry=False)

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    @property
    def nodes(self) -> list[str]:
        """The Ray node of each actor, in pool order."""
        return [s.node for s in self._slots]

    def actor_of(self, client_id: int) -> int:
        """The index of the actor ``client_id`` is pinned to."""
        return self._slot_of[client_id]

    def _batches(self, ids: Sequence[int], requests: Mapping[int, bytes]) -> Iterator[list[Any]]:
        """``ids``' requests with their state, cut into batches of at most MAX_BATCH_BYTES (each
        request is encoded only when its batch is made)."""
        batch: list[Any] = []
        size = 0
        for cid in ids:
            payload = requests[cid]
            if batch and size + len(payload) > MAX_BATCH_BYTES:
                yield batch
                batch, size = [], 0
            batch.append((cid, payload, self._state.get(cid)))
            size += len(payload)
        if batch:
            yield batch

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        ray = require_ray()
        start = self._clock()
        deadline_at = None if deadline_s is None else time.time() + deadline_s
        by_slot: dict[int, list[int]] = {}
        for cid in requests:
            if cid not in self._slot_of:
                raise KeyError(f"Client {cid} is not reachable over this transport.")
            by_slot.setdefault(self._slot_of[cid], []).append(cid)
        outcomes: dict[int, Outcome] = {}
        queues = {i: self._batches(ids, requests) for i, ids in by_slot.items()}
        running: dict[Any, tuple[int, list[int]]] = {}  # generator -> (slot, its client ids)
        dead: dict[int, str] = {}

        def submit(index: int) -> None:
            batch = next(queues[index], None)
            if batch is None:
                return
            gen = self._slots[index].handle.serve.remote(batch, deadline_at)
            running[gen] = (index, [cid for cid, _, _ in batch])

        for index in by_slot:
            submit(index)
        while running:
            left = None if deadline_s is None else deadline_s - (self._clock() - start)
            if left is not None and left <= 0:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=left)
            for gen in ready:
                index, pending = running[gen]
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    submit(index)
                    continue
                except ray.exceptions.RayActorError as exc:
                    del running[gen]
                    dead[index] = _first_line(exc)
                    continue
                except ray.exceptions.RayTaskError as exc:  # the actor's own code failed
                    del running[gen]
                    for cid in pending:
                        outcomes[cid] = Failed(cid, FailureKind.ERROR, _first_line(exc))
                        self._arrived(outcomes[cid])
                    submit(index)
                    continue
                except ray.exceptions.RayError as exc:  # its results were lost with its node
                    del running[gen]
                    dead[index] = _first_line(exc)
                    continue
                pending.remove(item.client_id)
                outcomes[item.client_id] = self._outcome(item)
                self._arrived(outcomes[item.client_id])
        for index, reason in dead.items():
            lost = [cid for cid in by_slot[index] if cid not in outcomes]
            log.warning(
                "Ray actor %d died (%s); its %d clients of this exchange count as failed and a "
                "new actor takes its clients",
                index,
                reason,
                len(lost),
            )
            for cid in lost:
                outcomes[cid] = Failed(cid, FailureKind.ERROR, f"its Ray actor died: {reason}")
        if dead:
            self._replace([self._slots[i] for i in dead])
        waited = self._clock() - start
        return [
            outcomes.get(cid)
            or Failed(cid, FailureKind.TIMEOUT, f"no reply within the deadline ({waited:.2f} s)")
            for cid in requests
        ]

    def _outcome(self, item: _Item) -> Outcome:
        """``item`` as an outcome, its client's state kept when it changed."""
        if item.state_changed:
            if item.state is None:
                self._state.pop(item.client_id, None)
            else:
                self._state[item.client_id] = item.state
        if item.timed_out:
            return Failed(item.client_id, FailureKind.TIMEOUT, item.error or "timed out")
        if item.reply is None:
            return Failed(item.client_id, FailureKind.ERROR, item.error or "no reply")
        return Delivered(item.client_id, item.reply, item.seconds)

    def _replace(self, slots: Sequence[_Slot]) -> None:
        """Start a fresh actor for each of ``slots`` (same clients) and wait until it is ready."""
        ray = require_ray()
        for slot in slots:
            _kill(ray, [slot.handle])
            slot.handle = self._new_actor(ray)
        self._load(ray, slots, retry=False)
        self.replaced += len(slots)

    def close(self) -> None:
        """Stop the pool: its actors and the Ray instance if this transport started it, else
        (Ray joined by this process before, as a sweep or a test suite does) empty its actors
        and keep them for the next pool of the same shape, which then starts no process
        (:func:`release_idle_actors` stops them)."""
        ray = require_ray()
        if not ray.is_initialized():
            return
        handles = [s.handle for s in self._slots if s.handle is not None]
        for slot in self._slots:
            slot.handle = None
        if not handles and not self._owns_ray:
            return
        if self._owns_ray:
            _kill(ray, handles)
            ray.shutdown()
            return
        for handle in handles:  # queued behind any straggler still running on it
            handle.unload.remote()
        _IDLE.setdefault(self._shape, []).extend(handles)


# Emptied actors of closed pools, by (CPUs, GPUs, Ray session), for the next pool of that shape.
_IDLE: dict[tuple[float, float, str], list[Any]] = {}


def _session(ray: Any) -> str:
    """The Ray connection of this process (a new one after ``ray.shutdown`` and ``ray.init``)."""
    return str(ray.get_runtime_context().get_job_id())


def _kill(ray: Any, handles: Sequence[Any]) -> None:
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # already gone: nothing to stop
            log.debug("stopping a Ray actor: %s", exc)


def release_idle_actors() -> None:
    """Stop the emptied actors that closed pools left for later ones (see :meth:`RayTransport.close`)."""
    ray = require_ray()
    while _IDLE:
        _, handles = _IDLE.popitem()
        if ray.is_initialized():
            _kill(ray, handles)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
