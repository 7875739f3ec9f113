"""Secure aggregation as a round protocol: what both halves share.

The server learns only the sum of the clients' updates (Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017), over the complete graph or, in
SecAgg+, over a sparse random graph (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). A semi-honest round is four exchanges over any transport
(a verified round adds two, below):

0. advertise keys: every sampled client answers the round's public setup with two X25519 public
   keys, ``c`` (to encrypt shares) and ``s`` (to agree masks), signed where clients have
   identities (see verified rounds below);
1. share keys: every client Shamir-shares its self-mask seed ``b_u`` and its private key
   ``s_u^SK`` among its share holders (its neighbours and itself), encrypts each holder's bundle
   under their agreed key, and the server relays the ciphertexts;
2. masked input: every client trains, encodes its clipped update in ``Z_{2^b}`` and sends
   ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` over its neighbours
   that shared in phase 1;
3. unmasking: the survivors reveal shares of ``b_v`` for every peer that sent ``y_v`` and of
   ``s_v^SK`` for every peer that did not, never both for one peer; the server removes the
   self-masks and the dropped clients' pairwise masks and is left with ``sum_u x_u``.

Client ``u``'s share holders are ``u`` and its neighbours; the Shamir threshold ``t`` applies
to every neighbourhood. While every neighbourhood keeps ``t`` members through phase 3, any
dropouts are recovered exactly; otherwise the round is aborted (:class:`SecAggAbortedError`), before
phase 3 whenever the shortfall is visible then, so that nothing is revealed.

With distributed DP (:mod:`fedguard.algorithms.privacy.distributed_dp`) each client adds its share of
Skellam noise to its encoded update in phase 2, before masking; the fit config carries the
mechanism (:func:`distributed_config`), and the server aborts, and every client refuses to
unmask, a round with fewer masked inputs than the mechanism's noise shares.

**Verified rounds** (a setup with a fresh 32-byte ``nonce``; the default wherever clients have
:class:`Identities`) are the protocol of Bonawitz et al. secure against a malicious server:

* phase 0: each client signs ``(round, nonce, id, c, s, commitment)`` with its long-term Ed25519
  key; every peer and the server check it against the registry of identities, which the clients
  obtain outside the server's control;
* reveal (SecAgg+ only, between phases 0 and 1): the SecAgg+ graph comes from randomness the server
  cannot choose alone. Each client commits to 32 random bytes ``r`` in its signed advertisement;
  the server sends every advertiser all signed advertisements (the commitments are fixed), then
  each reveals ``r``; the graph seed is ``H(round, nonce, sorted (id, r))`` over the clients whose
  reveal arrived, sent to every client with the share request. A client refuses reveals that do
  not open their signed commitments or leave out its own ``r``, and keys from anyone outside the
  neighbourhood the seed gives. A client that drops between commit and reveal is left out of the
  seed and of the round. **Residual bias:** the server sees all reveals before it decides whom to
  keep, so by dropping ``d`` revealers (each a dropout of the round, which must still leave every
  neighbourhood ``t`` holders and the quorum of clients) it chooses among up to ``2^d`` graphs; a
  colluding client can likewise withhold its reveal after seeing the others'. The probability of a
  bad graph in Bell et al.'s analysis grows by at most that factor (union bound);
* consistency check (between phases 2 and 3): the server sends each survivor the set ``U3`` of
  clients whose masked inputs it holds; each signs ``(round, nonce, transcript, U3)`` (the
  transcript binds the cohort, graph and threshold it saw); the unmasking request carries the
  signatures, and a client reveals shares only if ``alive`` is exactly the set it signed and it
  verifies :attr:`RoundSetup.quorum` signatures by distinct survivors over that set;
* replay: every signed payload binds the round and its nonce; a client refuses an older round than
  one it has begun and a nonce it has seen.

This module holds the pieces that both halves (:mod:`.secagg_client`, :mod:`.secagg_server`)
need: the phases, the settings, the round setup, the identities and the errors. Without
identities (``[secure_aggregation] server = "semi-honest"``, or a deployed client without its key)
the server is trusted to be honest but curious.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.algorithms.privacy import distributed_dp
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import graph as secagg_graph
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.protocol import messages


class Phase(enum.IntEnum):
    """The exchanges of a secure-aggregation round, in order (``REVEAL`` and ``CONSISTENCY``
    only in verified rounds, ``REVEAL`` only in SecAgg+)."""

    ADVERTISE = 0
    REVEAL = 1
    SHARE = 2
    MASK = 3
    CONSISTENCY = 4
    UNMASK = 5


REQUEST_PHASES: dict[str, Phase] = {
    messages.SecAggSetup.__name__: Phase.ADVERTISE,
    messages.SecAggRevealRequest.__name__: Phase.REVEAL,
    messages.SecAggShareRequest.__name__: Phase.SHARE,
    messages.SecAggMaskRequest.__name__: Phase.MASK,
    messages.SecAggConsistencyRequest.__name__: Phase.CONSISTENCY,
    messages.SecAggUnmaskRequest.__name__: Phase.UNMASK,
    # aggregation under homomorphic encryption (fedguard.protocol.he): the encrypted update is
    # sent where a masked input is, the sum decrypted where masks are removed
    messages.HeEncryptRequest.__name__: Phase.MASK,
    messages.HeDecryptRequest.__name__: Phase.UNMASK,
}


class Mode(enum.StrEnum):
    SECAGG = "secagg"  # complete graph (Bonawitz et al. 2017)
    SECAGG_PLUS = "secagg+"  # random k-regular graph (Bell et al. 2020)


DDP_NOISE = "ddp_noise_multiplier"  # distributed DP: the Skellam noise multiplier z
DDP_CLIENTS = "ddp_noise_clients"  # ... shared by this many clients (the fewest a round sums)


def distributed_config(mechanism: distributed_dp.Skellam) -> dict[str, messages.Scalar]:
    """The fit-config entries that tell a client to add its share of ``mechanism``'s noise."""
    return {DDP_NOISE: mechanism.noise_multiplier, DDP_CLIENTS: mechanism.noise_clients}


def distributed_from_config(config: Mapping[str, messages.Scalar]) -> distributed_dp.Skellam | None:
    """The mechanism that :func:`distributed_config` wrote, or None without distributed DP."""
    if DDP_NOISE not in config:
        return None
    try:
        return distributed_dp.Skellam(
            messages.config_float(config, DDP_NOISE), messages.config_int(config, DDP_CLIENTS)
        )
    except ValueError as exc:  # a MessageError included
        raise SecAggError(
            f"The distributed DP settings of the fit task are invalid: {exc}"
        ) from None


class SecAggError(RuntimeError):
    """A client refuses a request that breaks the protocol (it reveals nothing then)."""


class SecAggAbortedError(RuntimeError):
    """Too few clients remain to unmask the sum; the round is abandoned, the model unchanged.

    ``metrics`` holds the round's counts and bytes so the run can still report them.
    """

    def __init__(self, message: str, metrics: dict[str, float | int | None]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass(frozen=True)
class Settings:
    """Secure aggregation as configured for a run (the same every round).

    ``max_weight`` caps a client's integer weight (its example count) so that the fixed-point
    sum cannot overflow; ``weighted = False`` sums the clipped updates with weight 1 each (as
    central DP needs). ``threshold`` and ``neighbours`` default per round from the cohort size
    and ``dropout_rate``, the share of clients a round must survive losing (see
    :func:`fedguard.algorithms.secagg.graph.tolerant_degree`).
    ``distributed`` adds distributed DP (unweighted sums only): the clients noise their encoded
    updates and a round needs at least ``distributed.noise_clients`` masked inputs.
    """

    mode: Mode
    clip_norm: float
    max_weight: int
    bits: int = 32
    weighted: bool = True
    threshold: int | None = None
    neighbours: int | None = None
    distributed: distributed_dp.Skellam | None = None
    dropout_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.mode is Mode.SECAGG and self.neighbours is not None:
            raise ValueError('Neighbours are only chosen in mode "secagg+", not "secagg".')
        if self.distributed is not None and self.weighted:
            raise ValueError("Distributed DP sums unweighted updates; set weighted = False.")

    def fixed_point(self, num_clients: int) -> secagg_quantize.FixedPoint:
        """The encoding for ``num_clients``; raises ValueError if the ring is too small."""
        if self.distributed is not None:
            return distributed_dp.fixed_point(
                bits=self.bits,
                clip_norm=self.clip_norm,
                num_clients=num_clients,
                mechanism=self.distributed,
            )
        return secagg_quantize.fixed_point(
            bits=self.bits,
            clip_norm=self.clip_norm,
            num_clients=num_clients,
            max_weight=self.max_weight if self.weighted else 1,
        )

    def setup(
        self,
        round_: int,
        sampled: list[int],
        *,
        graph_seed: int,
        dim: int,
        nonce: bytes = b"",
    ) -> RoundSetup:
        """The public setup of one round with ``sampled`` clients; a ``nonce`` (32 fresh random
        bytes) makes it a verified round, secure against a malicious server."""
        n = len(sampled)
        if n < 2:
            raise ValueError(f"Secure aggregation needs at least 2 sampled clients, got {n}.")
        if self.mode is Mode.SECAGG:
            k = n - 1
        elif self.neighbours is not None:
            k = secagg_graph.feasible_degree(n, self.neighbours)
        else:
            k = secagg_graph.tolerant_degree(n, self.dropout_rate)
        t = self.threshold if self.threshold is not None else secagg_graph.default_threshold(k + 1)
        if 2 * t <= k + 1:  # every client would refuse it (see check_majority)
            raise ValueError(
                f"the threshold {t} is not more than half of the {k + 1} share holders of a "
                "client, which clients refuse (the server could collect both kinds of share)"
            )
        return RoundSetup(
            round=round_,
            sampled=tuple(sorted(sampled)),
            neighbours=k,
            threshold=t,
            graph_seed=graph_seed,
            bits=self.bits,
            clip_norm=self.clip_norm,
            max_weight=self.max_weight if self.weighted else 1,
            weighted=self.weighted,
            dim=dim,
            distributed=self.distributed,
            nonce=nonce,
        )


@dataclass(frozen=True)
class _Structure:
    """What a round's clients, degree and seed fix: the graph, the share holders of each client
    and the Shamir points."""

    graph: dict[int, frozenset[int]]
    holders: dict[int, frozenset[int]]
    points: dict[int, int]


@functools.lru_cache(maxsize=16)
def _structure(sampled: tuple[int, ...], neighbours: int, seed: int) -> _Structure:
    """The :class:`_Structure` of a round, computed once for all the setups that share it (a
    simulator holds one setup per client, each of which would otherwise rebuild ``O(n)``
    dictionaries: ``O(n^2)`` per round at a thousand clients)."""
    graph = secagg_graph.harary_graph(sampled, neighbours, seed)
    holders = {u: peers | {u} for u, peers in graph.items()}
    return _Structure(graph, holders, {cid: i + 1 for i, cid in enumerate(sampled)})


@functools.lru_cache(maxsize=16)
def _transcript(
    round_: int, nonce: bytes, sampled: tuple[int, ...], neighbours: int, threshold: int, seed: int
) -> bytes:
    """:func:`.crypto.transcript`, once per round for all of a node's clients."""
    return secagg_crypto.transcript(round_, nonce, sampled, neighbours, threshold, seed)


@dataclass(frozen=True)
class RoundSetup:
    """The public parameters of one round, as the server publishes them in phase 0."""

    round: int
    sampled: tuple[int, ...]
    neighbours: int
    threshold: int
    graph_seed: int
    bits: int
    clip_norm: float
    max_weight: int
    weighted: bool
    dim: int
    distributed: distributed_dp.Skellam | None = None  # not on the wire: from the fit config
    nonce: bytes = b""  # a verified round's fresh nonce; empty: the semi-honest protocol

    def __post_init__(self) -> None:
        holders = self.neighbours + 1
        if not 1 <= self.threshold <= holders:
            raise ValueError(
                f"The threshold must be between 1 and the {holders} share holders of a "
                f"client, got {self.threshold}."
            )
        if self.nonce and len(self.nonce) != secagg_crypto.ROUND_NONCE_BYTES:
            raise ValueError(
                f"A round nonce has {secagg_crypto.ROUND_NONCE_BYTES} bytes, got {len(self.nonce)}."
            )

    @property
    def verified(self) -> bool:
        """Whether this round runs the protocol secure against a malicious server."""
        return bool(self.nonce)

    @property
    def committed_graph(self) -> bool:
        """Whether the graph comes from the clients' committed randomness (verified SecAgg+);
        the complete graph needs no seed."""
        return self.verified and self.neighbours < len(self.sampled) - 1

    @property
    def quorum(self) -> int:
        """The fewest consistency signatures over one survivor set a client needs before it
        unmasks: at least ``t`` (Bonawitz et al.) and more than half of the sampled clients.

        Each honest client signs one survivor set per round, so two groups of honest clients
        told different sets cannot both collect a majority: every honest client that unmasks
        was told the same set. In the complete graph ``t`` is already a majority; in SecAgg+
        ``t`` counts one neighbourhood only, which would let a server tell disjoint groups of
        ``t`` different stories."""
        return max(self.threshold, len(self.sampled) // 2 + 1)

    @cached_property
    def transcript(self) -> bytes:
        """A digest of the round's public parameters (see :func:`.crypto.transcript`)."""
        return _transcript(
            self.round, self.nonce, self.sampled, self.neighbours, self.threshold, self.graph_seed
        )

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        """Every sampled client's neighbours (the complete graph when ``k = n - 1``); shared
        by every setup of the same clients, degree and seed: read it, never change it."""
        return self._structure.graph

    @property
    def points(self) -> dict[int, int]:
        """Each client's Shamir x-coordinate: its position among the sampled clients plus one."""
        return self._structure.points

    def holders(self, client_id: int) -> frozenset[int]:
        """Who holds shares of ``client_id``'s secrets: its neighbours and itself."""
        return self._structure.holders[client_id]

    @cached_property
    def _structure(self) -> _Structure:
        return _structure(self.sampled, self.neighbours, self.graph_seed)

    @property
    def min_inputs(self) -> int:
        """The fewest masked inputs whose sum may be unmasked (the noise shares with DDP)."""
        return 1 if self.distributed is None else self.distributed.noise_clients

    @cached_property
    def fixed_point(self) -> secagg_quantize.FixedPoint:
        if self.distributed is not None:
            return distributed_dp.fixed_point(
                bits=self.bits,
                clip_norm=self.clip_norm,
                num_clients=len(self.sampled),
                mechanism=self.distributed,
            )
        return secagg_quantize.fixed_point(
            bits=self.bits,
            clip_norm=self.clip_norm,
            num_clients=len(self.sampled),
            max_weight=self.max_weight,
        )

    def shortfall(self, secrets_of: set[int], available: set[int]) -> str | None:
        """Why some client in ``secrets_of`` has fewer than ``t`` holders in ``available``."""
        for u in sorted(secrets_of):
            have = len(self.holders(u) & available)
            if have < self.threshold:
                return (
                    f"client {u} has {have} of its share holders left, "
                    f"the threshold is {self.threshold}"
                )
        return None

    def to_message(self, client_id: int) -> messages.SecAggSetup:
        return messages.SecAggSetup(
            round=self.round,
            client_id=client_id,
            sampled=list(self.sampled),
            neighbours=self.neighbours,
            threshold=self.threshold,
            graph_seed=self.graph_seed,
            bits=self.bits,
            clip_norm=self.clip_norm,
            max_weight=self.max_weight,
            weighted=self.weighted,
            dim=self.dim,
            verified=self.verified,
            nonce=self.nonce,
        )

    @classmethod
    def from_message(cls, m: messages.SecAggSetup) -> RoundSetup:
        if m.client_id not in m.sampled:
            raise SecAggError(f"Client {m.client_id} is not among the round's sampled clients.")
        sampled = tuple(sorted(m.sampled))  # integers: checked by the message schema
        if len(set(sampled)) != len(sampled):
            raise SecAggError("The round's sampled clients repeat an id.")
        if m.verified != bool(m.nonce):
            raise SecAggError("A verified round needs a nonce, and only a verified round has one.")
        try:
            return cls(
                round=m.round,
                sampled=sampled,
                neighbours=secagg_graph.feasible_degree(len(sampled), m.neighbours),
                threshold=m.threshold,
                graph_seed=m.graph_seed,
                bits=m.bits,
                clip_norm=m.clip_norm,
                max_weight=m.max_weight,
                weighted=m.weighted,
                dim=m.dim,
                nonce=m.nonce,
            )
        except ValueError as exc:
            raise SecAggError(f"The round's setup is invalid: {exc}") from None


@dataclass(frozen=True)
class Identities:
    """Long-term Ed25519 identities of a federation, as one node knows them.

    ``registry`` holds every member's public key, obtained outside the server's control (for a
    deployment: the identities file handed out with the tokens; in simulation: derived from the
    run's seed); ``own`` the private keys of the client ids this node answers for (one for a
    deployed client, all of them in the simulator, none on the server). A client with
    identities only takes part in verified rounds, secure against a malicious server.
    """

    registry: Mapping[int, ed25519.Ed25519PublicKey]
    own: Mapping[int, ed25519.Ed25519PrivateKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cid, key in self.own.items():
            if self.registry.get(cid) != key.public_key():
                raise ValueError(f"The identity of client {cid} is not the registered one.")

    @classmethod
    def simulated(cls, seed: int, client_ids: Iterable[int]) -> Identities:
        """Deterministic identities of simulated clients from the run's ``seed`` (see
        :func:`~fedguard.algorithms.secagg.crypto.simulated_identity`: for simulation only)."""
        own = {cid: secagg_crypto.simulated_identity(seed, cid) for cid in client_ids}
        return cls({cid: key.public_key() for cid, key in own.items()}, own)

    def public(self) -> Identities:
        """The same registry without any private key (what a server holds)."""
        return Identities(self.registry)


def check_majority(setup: RoundSetup) -> None:
    """Refuse a threshold of at most half of a client's share holders, whatever the config.

    With ``2 t <= k + 1`` a server can ask one half of ``u``'s holders for shares of ``b_u`` (``u``
    alive) and the other half for shares of ``s_u^SK`` (``u`` dropped), each request consistent
    on its own, and unmask ``u``'s input (Bell et al. 2020, section 3); with ``t`` above half,
    the two sets would need a common honest holder, who never reveals both.
    """
    holders = setup.neighbours + 1
    if 2 * setup.threshold <= holders:
        raise SecAggError(
            f"The threshold {setup.threshold} is not more than half of the {holders} share "
            "holders of a client; the server could collect both kinds of share of one client."
        )


@dataclass(frozen=True)
class Pins:
    """What a client holds the server to, from the client's own configuration.

    A server is trusted to follow the protocol, not to choose its parameters: a client with pins
    refuses (:class:`SecAggError`, revealing nothing) a round whose public setup or fit task
    promises less than ``settings`` does. ``settings`` are the run's secure-aggregation settings
    as the client's configuration states them: the graph degree it gives for the round's cohort
    (the complete graph in mode ``"secagg"``), at least its threshold, at most its clip, unweighted
    sums where it sums unweighted, and with distributed DP at least its noise multiplier and
    exactly its noise shares. ``client_ids`` is the federation (a sampled id outside it is a peer
    the server made up), ``min_cohort`` the fewest sampled clients and ``min_inputs`` the fewest
    masked inputs whose sum the client helps unmask.
    """

    settings: Settings
    client_ids: frozenset[int] | None = None
    min_cohort: int = 2
    min_inputs: int = 1

    def check_setup(self, setup: RoundSetup, client_id: int) -> None:
        """Raise :class:`SecAggError` unless the server's phase-0 setup keeps to the pins."""
        prefix = f"Client {client_id} refuses round {setup.round}:"
        if self.client_ids is not None:
            strangers = sorted(set(setup.sampled) - self.client_ids)
            if strangers:
                raise SecAggError(
                    f"{prefix} the sampled clients {strangers} are not in its federation."
                )
        n = len(setup.sampled)
        if n < self.min_cohort:
            raise SecAggError(
                f"{prefix} {n} sampled clients, its configuration needs at least {self.min_cohort}."
            )
        try:
            own = self.settings.setup(
                setup.round, list(setup.sampled), graph_seed=setup.graph_seed, dim=setup.dim
            )
        except ValueError as exc:
            raise SecAggError(f"{prefix} its configuration gives no setup: {exc}") from None
        wanted = "the complete graph" if own.neighbours == n - 1 else f"{own.neighbours}"
        if setup.neighbours != own.neighbours:
            raise SecAggError(
                f"{prefix} {setup.neighbours} neighbours per client, its configuration gives "
                f"{wanted} for {n} clients."
            )
        if setup.threshold < own.threshold:
            raise SecAggError(
                f"{prefix} threshold {setup.threshold}, its configuration needs at least "
                f"{own.threshold} of {own.neighbours + 1} share holders."
            )
        if not setup.clip_norm <= own.clip_norm:  # NaN included
            raise SecAggError(
                f"{prefix} clip norm {setup.clip_norm:g}, its configuration allows at most "
                f"{own.clip_norm:g}."
            )
        if setup.weighted and not own.weighted:
            raise SecAggError(
                f"{prefix} a weighted sum, its configuration sums unweighted updates (user-level "
                "DP bounds each client's contribution by the clip)."
            )

    def check_distributed(
        self, mechanism: distributed_dp.Skellam | None, client_id: int, round_: int
    ) -> None:
        """Raise :class:`SecAggError` unless the fit task's distributed DP keeps to the pins."""
        pinned = self.settings.distributed
        if pinned is None:
            return
        prefix = f"Client {client_id} refuses round {round_}:"
        if mechanism is None:
            raise SecAggError(
                f"{prefix} the fit task has no distributed DP noise, its configuration adds it."
            )
        if mechanism.noise_multiplier < pinned.noise_multiplier:
            raise SecAggError(
                f"{prefix} noise multiplier {mechanism.noise_multiplier:g}, its configuration "
                f"needs at least {pinned.noise_multiplier:g}."
            )
        if mechanism.noise_clients != pinned.noise_clients:
            raise SecAggError(
                f"{prefix} the noise shared by {mechanism.noise_clients} clients, its "
                f"configuration shares it among {pinned.noise_clients}."
            )


def bundle_plaintext(b_share: bytes, s_share: bytes) -> bytes:
    """A share bundle: the holder's share of ``b_u`` then its share of ``s_u^SK``."""
    return b_share + s_share


def split_bundle(plaintext: bytes, share_len: int, sender: int) -> tuple[bytes, bytes]:
    if len(plaintext) != 2 * share_len:
        raise SecAggError(f"The share bundle from client {sender} has the wrong length.")
    return plaintext[:share_len], plaintext[share_len:]
