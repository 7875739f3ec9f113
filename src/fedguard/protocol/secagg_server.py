"""The server half of secure aggregation: four exchanges over a transport, then the unmasked sum.

See :mod:`fedguard.protocol.secagg` for the protocol (Bonawitz et al., CCS 2017; Bell et al.,
CCS 2020). :func:`secure_sum` runs one round: it relays keys and share bundles, collects the
masked inputs, asks the survivors for shares, reconstructs the self-mask seeds of the survivors
and the mask keys of the dropouts (batched Shamir interpolation), strips all masks and decodes
the fixed-point sum. A client that fails, times out or sends a malformed reply in any phase is a
dropout from then on. The server checks before each phase that every neighbourhood still has
``t`` members and aborts with :class:`~fedguard.protocol.secagg.SecAggAbortedError` otherwise;
the check before phase 3 means an aborted round reveals no share. A client whose advertised key
is not a valid X25519 point (all zeros, or any point of small order) is a dropout of phase 0, so
that its peers go on without it.

A verified round (``setup.nonce`` set, with the federation's
:class:`~fedguard.protocol.secagg.Identities`) is the protocol secure against a malicious server
(Bonawitz et al., section 4; Bell et al. for the graph). The server checks what the clients will
check, so that one misbehaving client is excluded and named (in the round's ``problems`` and the
log) instead of making its honest peers refuse the round:

* phase 0: an advertisement whose signature by the client's registered identity does not verify
  (or, in SecAgg+, without a commitment) is a dropout;
* reveal (SecAgg+): every client that advertised gets all signed advertisements and reveals its
  ``r``; a reveal that does not open its commitment is a dropout; the graph seed is the hash of
  the reveals that arrived, and the same reveals go to every client in phase 1;
* phase 1: a client whose bundles or share commitments are not addressed to exactly its holders,
  or whose ciphertexts have the wrong length, is a dropout;
* phase 2: a masked input of the wrong shape or dtype is a dropout;
* consistency: every survivor gets the survivor set ``U3`` and signs it; an invalid signature
  names the client, which is then not asked to unmask (its input, already in the sum, stays);
* phase 3: a share that does not match the commitment its owner made in phase 1 is discarded
  and its holder named; each secret is rebuilt from ``t`` matching shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.algorithms.secagg import shamir as secagg_shamir
from fedguard.protocol import messages
from fedguard.protocol.ledger import RoundLedger
from fedguard.protocol.secagg import Identities, Phase, RoundSetup, SecAggAbortedError
from fedguard.protocol.secagg_client import SECRET_BYTES, SHARE_BYTES
from fedguard.protocol.transport import Transport

log = logging.getLogger("fedguard.round")

MaskRequest = Callable[[int, messages.ByteMap], messages.SecAggMaskRequest]


@dataclass(frozen=True)
class SecureSum:
    """What the server learns: the weighted sum of clipped updates and the total weight."""

    total: np.ndarray  # float64 [D]: sum_u w_u x_u
    weight: int  # sum_u w_u
    survivors: list[int]
    metrics: dict[str, float | int | None]
    problems: list[tuple[int, str]] = field(default_factory=list)


_Reply = TypeVar("_Reply", bound=messages.SecAggMessage)


def _replies(
    transport: Transport,
    phase: Phase,
    requests: Mapping[int, messages.SecAggMessage],
    expected: type[_Reply],
    ledger: RoundLedger,
    deadline_s: float | None,
) -> Iterator[tuple[int, _Reply]]:
    """Send one phase's requests; the decoded replies that came back for the right client,
    decoded one at a time as the caller takes them (the masked inputs: one in memory at a time
    instead of ``n``)."""
    encoded = {cid: messages.encode(m) for cid, m in requests.items()}
    ledger.bytes_down += sum(len(p) for p in encoded.values())
    for outcome in transport.exchange(encoded, deadline_s=deadline_s):
        reply = ledger.receive(phase, outcome, expected)
        if reply is not None:
            yield outcome.client_id, reply


def _require(
    setup: RoundSetup,
    phase: Phase,
    secrets_of: set[int],
    alive: set[int],
    ledger: RoundLedger,
    min_survivors: int = 1,
) -> None:
    reason = setup.shortfall(secrets_of, alive)
    if reason is None and len(alive) < min_survivors:
        reason = f"{len(alive)} clients left, the round needs {min_survivors}"
    if reason is not None or not alive:
        raise SecAggAbortedError(
            f"Round {setup.round}: secure aggregation aborted before phase {phase.name.lower()}: "
            f"{reason or 'no client left'}; nothing was unmasked.",
            ledger.metrics(0),
        )


def secure_sum(
    transport: Transport,
    setup: RoundSetup,
    mask_request: MaskRequest,
    *,
    deadline_s: float | None = None,
    min_survivors: int = 1,
    identities: Identities | None = None,
) -> SecureSum:
    """Run the phases with ``setup.sampled`` and return the unmasked sum.

    ``mask_request(client_id, ciphertexts)`` builds the phase-2 request (the fit task with the
    share bundles addressed to that client). Fewer than ``min_survivors`` masked inputs abort
    the round before unmasking. A verified ``setup`` (one with a nonce) needs the federation's
    ``identities`` (public keys only) to check the clients' signatures.
    """
    if setup.verified and identities is None:
        raise ValueError("A verified round needs the clients' registered identities.")
    ledger = RoundLedger(setup.round, len(setup.sampled), "secure aggregation")
    log.info(
        "round %d: secure aggregation of %d clients, %s",
        setup.round,
        len(setup.sampled),
        "verified (signed keys, consistency check)" if setup.verified else "semi-honest server",
    )
    everyone = set(setup.sampled)
    _require(setup, Phase.ADVERTISE, everyone, everyone, ledger)
    keys = _advertise(transport, setup, ledger, deadline_s, identities)
    u1 = set(keys)
    _require(setup, Phase.SHARE, u1, u1, ledger)
    reveals: dict[int, bytes] = {}
    if setup.committed_graph:
        _require(setup, Phase.REVEAL, u1, u1, ledger, setup.quorum)
        reveals = _reveal(transport, setup, keys, ledger, deadline_s)
        seed = secagg_crypto.graph_seed(setup.round, setup.nonce, reveals)
        setup = replace(setup, graph_seed=seed)
        keys = {u: keys[u] for u in sorted(reveals)}
        u1 = set(keys)
        _require(setup, Phase.SHARE, u1, u1, ledger, setup.quorum)
    shared = _share(transport, setup, keys, reveals, ledger, deadline_s)
    bundles = {u: reply.ciphertexts for u, reply in shared.items()}
    u2 = set(bundles)
    _require(setup, Phase.MASK, u2, u2, ledger)
    requests = {
        u: mask_request(u, {v: bundles[v][u] for v in setup.graph[u] & u2}) for u in sorted(u2)
    }
    masked_sum = np.zeros(setup.dim + 1, dtype=setup.fixed_point.dtype)
    u3: set[int] = set()
    replies = _replies(
        transport, Phase.MASK, requests, messages.SecAggMaskedInput, ledger, deadline_s
    )
    for u, reply in replies:
        if _check_masked(setup, u, reply, ledger):
            np.add(masked_sum, reply.masked.numpy().view(masked_sum.dtype), out=masked_sum)
            u3.add(u)
    least = max(min_survivors, setup.min_inputs)
    signatures: dict[int, bytes] = {}
    holders = u3
    if identities is not None and setup.verified:
        _require(setup, Phase.CONSISTENCY, u2, u3, ledger, max(least, setup.quorum))
        signatures = _consistency(transport, setup, u3, identities, ledger, deadline_s)
        holders = set(signatures)
        _require(setup, Phase.UNMASK, u2, holders, ledger, setup.quorum)
    _require(setup, Phase.UNMASK, u2, u3, ledger, least)
    b_shares, s_shares = _unmask_shares(
        transport, setup, u2, u3, holders, signatures, ledger, deadline_s
    )
    if setup.verified:
        commitments = {u: reply.commitments for u, reply in shared.items()}
        b_shares, s_shares = _matching_shares(setup, commitments, b_shares, s_shares, ledger)
    ring_sum = _unmasked_sum(setup, keys, masked_sum, u3, u2, b_shares, s_shares, ledger)
    decoded = secagg_quantize.decode_sum(ring_sum, setup.fixed_point)
    return SecureSum(
        decoded.total, decoded.weight, sorted(u3), ledger.metrics(len(u3)), ledger.problems
    )


def _advertise(
    transport: Transport,
    setup: RoundSetup,
    ledger: RoundLedger,
    deadline_s: float | None,
    identities: Identities | None,
) -> dict[int, messages.SecAggKeys]:
    requests = {u: setup.to_message(u) for u in setup.sampled}
    replies = dict(
        _replies(transport, Phase.ADVERTISE, requests, messages.SecAggKeys, ledger, deadline_s)
    )
    keys: dict[int, messages.SecAggKeys] = {}
    for u, reply in replies.items():
        try:  # a key no peer can agree with would fail every neighbour of ``u``, not just ``u``
            secagg_crypto.check_public_key(reply.c_public)
            secagg_crypto.check_public_key(reply.s_public)
        except secagg_crypto.CryptoError as exc:
            ledger.drop(Phase.ADVERTISE, u, f"invalid advertised key: {exc}")
            continue
        if identities is not None:  # the peers would refuse it: exclude it for them
            problem = _signature_problem(setup, identities, reply)
            if problem is not None:
                ledger.drop(Phase.ADVERTISE, u, problem)
                continue
        keys[u] = reply
    return keys


def _signature_problem(
    setup: RoundSetup, identities: Identities, reply: messages.SecAggKeys
) -> str | None:
    """Why the peers of ``reply``'s client would refuse its advertisement, or None."""
    u = reply.client_id
    if setup.committed_graph and len(reply.commitment) != secagg_crypto.DIGEST_BYTES:
        return "no commitment to its graph randomness"
    if not setup.committed_graph and reply.commitment:
        return "a commitment in a round without a committed graph"
    identity = identities.registry.get(u)
    if identity is None:
        return "no registered identity"
    payload = secagg_crypto.keys_message(
        setup.round, setup.nonce, u, reply.c_public, reply.s_public, reply.commitment
    )
    try:
        secagg_crypto.verify(identity, reply.signature, payload, client_id=u)
    except secagg_crypto.CryptoError as exc:
        return f"bad signature: {exc}"
    return None


def _reveal(
    transport: Transport,
    setup: RoundSetup,
    keys: Mapping[int, messages.SecAggKeys],
    ledger: RoundLedger,
    deadline_s: float | None,
) -> dict[int, bytes]:
    """Verified SecAgg+: send every advertiser all signed advertisements, collect the ``r``
    that open their commitments."""
    # the same two maps go to every client: packed once, written without a per-entry step
    pack = messages.PackedByteMap.pack
    advertised = pack({v: k.c_public + k.s_public + k.commitment for v, k in keys.items()})
    signatures = pack({v: k.signature for v, k in keys.items()})
    requests = {
        u: messages.SecAggRevealRequest(setup.round, u, advertised, signatures) for u in keys
    }
    replies = _replies(transport, Phase.REVEAL, requests, messages.SecAggReveal, ledger, deadline_s)
    reveals: dict[int, bytes] = {}
    for u, reply in replies:
        opened = secagg_crypto.commitment(setup.round, setup.nonce, u, reply.reveal)
        if opened != keys[u].commitment:
            ledger.drop(Phase.REVEAL, u, "its reveal does not open its commitment")
            continue
        reveals[u] = reply.reveal
    return reveals


def _share(
    transport: Transport,
    setup: RoundSetup,
    keys: Mapping[int, messages.SecAggKeys],
    reveals: Mapping[int, bytes],
    ledger: RoundLedger,
    deadline_s: float | None,
) -> dict[int, messages.SecAggShares]:
    advertised = set(keys)
    public = {v: k.c_public + k.s_public for v, k in keys.items()}
    revealed = messages.PackedByteMap.pack(reveals)  # the same for every client
    requests = {}
    for u in sorted(keys):
        peers = sorted(setup.graph[u] & advertised)
        requests[u] = messages.SecAggShareRequest(
            setup.round,
            u,
            {v: public[v] for v in peers},
            {v: keys[v].signature for v in peers if keys[v].signature},
            revealed,
        )
    replies = dict(
        _replies(transport, Phase.SHARE, requests, messages.SecAggShares, ledger, deadline_s)
    )
    bundle_bytes = secagg_crypto.NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce, bundle, GCM tag
    shared: dict[int, messages.SecAggShares] = {}
    for u, reply in replies.items():
        expected = set(requests[u].public_keys)
        if set(reply.ciphertexts) != expected:
            ledger.drop(Phase.SHARE, u, "share bundles not addressed to exactly its neighbours")
            continue
        if any(len(c) != bundle_bytes for c in reply.ciphertexts.values()):
            ledger.drop(Phase.SHARE, u, f"share bundles not of {bundle_bytes} bytes each")
            continue
        if setup.verified and (
            set(reply.commitments) != expected | {u}
            or any(len(c) != 2 * secagg_crypto.DIGEST_BYTES for c in reply.commitments.values())
        ):
            ledger.drop(Phase.SHARE, u, "share commitments not one per share holder")
            continue
        shared[u] = reply
    return shared


def _consistency(
    transport: Transport,
    setup: RoundSetup,
    u3: set[int],
    identities: Identities,
    ledger: RoundLedger,
    deadline_s: float | None,
) -> dict[int, bytes]:
    """The consistency check: every survivor signs ``U3``; the valid signatures by survivor."""
    survivors = sorted(u3)
    requests = {u: messages.SecAggConsistencyRequest(setup.round, u, survivors) for u in survivors}
    payload = secagg_crypto.survivors_message(setup.round, setup.nonce, setup.transcript, survivors)
    replies = _replies(
        transport,
        Phase.CONSISTENCY,
        requests,
        messages.SecAggConsistencySignature,
        ledger,
        deadline_s,
    )
    signatures: dict[int, bytes] = {}
    for u, reply in replies:
        try:
            secagg_crypto.verify(
                identities.registry[u], reply.signature, payload, client_id=u, what="survivor set"
            )
        except secagg_crypto.CryptoError as exc:
            ledger.drop(Phase.CONSISTENCY, u, f"bad signature: {exc}")
            continue
        signatures[u] = reply.signature
    return signatures


def _check_masked(
    setup: RoundSetup, u: int, reply: messages.SecAggMaskedInput, ledger: RoundLedger
) -> bool:
    itemsize = setup.fixed_point.dtype.itemsize
    shape, dtype = tuple(reply.masked.shape), reply.masked.dtype
    if shape != (setup.dim + 1,) or dtype.itemsize != itemsize or dtype.is_floating_point:
        ledger.drop(
            Phase.MASK,
            u,
            f"masked input of shape {shape} and dtype {dtype}, expected "
            f"({setup.dim + 1},) integers of {itemsize} bytes",
        )
        return False
    return True


def _unmask_shares(
    transport: Transport,
    setup: RoundSetup,
    u2: set[int],
    u3: set[int],
    holders: set[int],
    signatures: Mapping[int, bytes],
    ledger: RoundLedger,
    deadline_s: float | None,
) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """Shares per secret owner: ``{owner: {holder: share}}`` for ``b`` (alive) and ``s``
    (dropped), asked of ``holders`` (the survivors that passed the consistency check)."""
    alive, dropped = sorted(u3), sorted(u2 - u3)
    signed = messages.PackedByteMap.pack(signatures)  # the same for every holder
    requests = {
        u: messages.SecAggUnmaskRequest(setup.round, u, alive, dropped, signed)
        for u in sorted(holders)
    }
    replies = dict(
        _replies(transport, Phase.UNMASK, requests, messages.SecAggUnmaskReply, ledger, deadline_s)
    )
    b_shares: dict[int, dict[int, bytes]] = {}
    s_shares: dict[int, dict[int, bytes]] = {}
    gone = u2 - u3
    for holder, reply in replies.items():
        held = setup.holders(holder)  # the graph is undirected: whose shares ``holder`` holds
        for owner in held.intersection(reply.b_shares, u3):
            b_shares.setdefault(owner, {})[holder] = reply.b_shares[owner]
        for owner in held.intersection(reply.s_shares, gone):
            s_shares.setdefault(owner, {})[holder] = reply.s_shares[owner]
    return b_shares, s_shares


def _matching_shares(
    setup: RoundSetup,
    commitments: Mapping[int, Mapping[int, bytes]],
    b_shares: Mapping[int, Mapping[int, bytes]],
    s_shares: Mapping[int, Mapping[int, bytes]],
    ledger: RoundLedger,
) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """The revealed shares that match their owners' phase-1 commitments (``H(b share) ||
    H(s share)`` per holder); a holder that revealed any other share is named and all its
    shares are discarded, so that each secret is rebuilt from honest shares only."""
    digest = secagg_crypto.DIGEST_BYTES
    bad: dict[int, str] = {}
    for kind, shares in ((b"b", b_shares), (b"s", s_shares)):
        at = slice(0, digest) if kind == b"b" else slice(digest, 2 * digest)
        for owner, by_holder in shares.items():
            for holder, share in by_holder.items():
                committed = commitments.get(owner, {}).get(holder, b"")[at]
                opened = secagg_crypto.share_commitment(
                    setup.round, setup.nonce, owner, holder, kind, share
                )
                if opened != committed and holder not in bad:
                    bad[holder] = (
                        f"its {kind.decode()}-share of client {owner} does not match the "
                        "commitment of its owner; its shares are discarded"
                    )
    for holder, reason in sorted(bad.items()):
        ledger.drop(Phase.UNMASK, holder, reason)

    def keep(shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        return {o: {h: v for h, v in hs.items() if h not in bad} for o, hs in shares.items()}

    return keep(b_shares), keep(s_shares)


def _reconstruct(
    setup: RoundSetup,
    shares: Mapping[int, Mapping[int, bytes]],
    owners: list[int],
    ledger: RoundLedger,
) -> dict[int, bytes]:
    """Every owner's secret from its first ``t`` holders' shares, in one batched interpolation."""
    chosen: list[list[int]] = []
    for owner in owners:
        held = sorted(shares.get(owner, {}))
        if len(held) < setup.threshold:
            raise SecAggAbortedError(
                f"Round {setup.round}: secure aggregation aborted in unmasking: only {len(held)} "
                f"shares of client {owner} arrived, the threshold is {setup.threshold}.",
                ledger.metrics(0),
            )
        chosen.append(held[: setup.threshold])
    if not owners:
        return {}
    try:
        ys = secagg_shamir.shares_from_bytes(
            [[shares[o][h] for h in hs] for o, hs in zip(owners, chosen, strict=True)],
            SECRET_BYTES,
        )
    except ValueError as exc:
        raise SecAggAbortedError(
            f"Round {setup.round}: secure aggregation aborted in unmasking: {exc}",
            ledger.metrics(0),
        ) from None
    points = [[setup.points[h] for h in hs] for hs in chosen]
    return dict(zip(owners, secagg_shamir.reconstruct(points, ys, SECRET_BYTES), strict=True))


def _unmasked_sum(
    setup: RoundSetup,
    keys: Mapping[int, messages.SecAggKeys],
    masked_sum: np.ndarray,
    survivors: set[int],
    u2: set[int],
    b_shares: Mapping[int, Mapping[int, bytes]],
    s_shares: Mapping[int, Mapping[int, bytes]],
    ledger: RoundLedger,
) -> np.ndarray:
    """``sum_u y_u - sum_u PRG(b_u)`` minus the surviving halves of the dropouts' pair masks
    (``masked_sum`` is ``sum_u y_u`` over the ``survivors``; it is updated in place)."""
    u3 = sorted(survivors)
    dropped = sorted(u2 - survivors)
    b_seeds = _reconstruct(setup, b_shares, u3, ledger)
    s_keys = _reconstruct(setup, s_shares, dropped, ledger)
    for u in u3:
        secagg_crypto.add_mask(masked_sum, b_seeds[u], subtract=True)
    for d in dropped:
        pair = secagg_crypto.key_pair_from_private(s_keys[d])
        if pair.public != keys[d].s_public:
            raise SecAggAbortedError(
                f"Round {setup.round}: secure aggregation aborted in unmasking: the shares of "
                f"client {d}'s mask key do not match its advertised key.",
                ledger.metrics(0),
            )
        # v added +PRG(s_vd) when d > v and -PRG(s_vd) when d < v: adding d's own masks
        # (-PRG when v < d, +PRG when v > d) takes those terms back out
        secagg_crypto.add_pairwise_masks(
            masked_sum,
            owner=d,
            private=pair.private,
            peer_publics={v: keys[v].s_public for v in setup.graph[d] & set(u3)},
            round_=setup.round,
        )
    return masked_sum & secagg_crypto.ring_mask(setup.bits)
