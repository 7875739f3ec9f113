"""The client half of secure aggregation: one handler per phase, state per client id.

See :mod:`fedguard.protocol.secagg` for the protocol (Bonawitz et al., CCS 2017; Bell et al.,
CCS 2020). A :class:`SecAggClient` answers the four request kinds for any number of client ids
(the simulator serves all of them from one object, a deployed client only its own). Between
phases it keeps a frozen state per client id in memory; the state is dropped once the client
answers the unmasking request, and any state of an earlier round is dropped when a later round
begins, so keys and shares never outlive their round.

A client refuses, with :class:`~fedguard.protocol.secagg.SecAggError` and without revealing
anything, a request that would let the server learn an individual input: a setup whose threshold
is not more than half of a client's share holders (:func:`~fedguard.protocol.secagg.check_majority`),
an unmasking request that asks for both kinds of share of one peer, lists a client both alive and
dropped or outside the round, reports a set of survivors and dropouts that does not match the
peers whose shares the mask request brought it, leaves fewer than ``t`` of its share holders
alive or fewer inputs in the sum than the noise or its pins need, or comes a second time. With
:class:`~fedguard.protocol.secagg.Pins` (from the client's own configuration) it also refuses a
setup or a fit task that asks for less than that configuration: another graph degree, a lower
threshold, a larger clip, less distributed DP noise or other noise shares, made-up peers or a
smaller cohort.

With :class:`~fedguard.protocol.secagg.Identities` (the default wherever clients have identities:
every simulated run, and a deployed client given its long-term key and the identities file) the
client runs only verified rounds, the protocol of Bonawitz et al. secure against a malicious
server, and refuses, revealing nothing:

* a setup that is not verified, or of an older round than one it has begun, or whose
  ``(round, nonce)`` it has seen before (replay);
* a peer's advertised keys whose signature by that peer's registered identity does not verify
  over this round and nonce (a substituted key, or one replayed from another round);
* in SecAgg+, a share request whose graph is not the one the revealed randomness gives: it
  recomputes the seed from the reveals (each checked against its signed commitment, its own
  included) and refuses keys from anyone outside the neighbourhood that seed gives;
* a consistency request whose survivor set does not contain it, names peers it does not know,
  or is smaller than the quorum (:attr:`~fedguard.protocol.secagg.RoundSetup.quorum`);
* an unmasking request whose ``alive`` list is not exactly the survivor set it signed, or that
  does not carry at least the quorum of valid signatures, by distinct survivors, over that
  same set and this round's transcript.

One object may serve many client ids (the simulator); it checks each signature once: the
verification of one signature over one payload by one key is a pure function, so a node that
hosts many clients need not repeat it for each of them. For the same reason it checks each
broadcast set once per round: the advertisements of a reveal request, the reveals against
their commitments and the consistency signatures of an unmasking request are the same bytes for
every client of a round, so a node remembers, by a digest of those bytes, the outcome of a set
it has checked (a simulator of a thousand clients would otherwise repeat a thousand checks for
each of them). A deployed client checks each set itself, once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch

from fedguard.algorithms.privacy import distributed_dp
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.algorithms.secagg import shamir as secagg_shamir
from fedguard.protocol import messages
from fedguard.protocol.secagg import (
    Identities,
    Pins,
    RoundSetup,
    SecAggError,
    bundle_plaintext,
    check_majority,
    distributed_from_config,
    split_bundle,
)

Fit = Callable[[messages.FitTask], messages.FitReply]
SECRET_BYTES = secagg_crypto.KEY_BYTES
SHARE_BYTES = secagg_shamir.num_chunks(SECRET_BYTES) * secagg_shamir.SHARE_DTYPE.itemsize


@dataclass(frozen=True)
class _Advertised:
    setup: RoundSetup
    c: secagg_crypto.KeyPair
    s: secagg_crypto.KeyPair
    reveal: bytes = b""  # verified SecAgg+: this client's r, committed to in its advertisement


@dataclass(frozen=True)
class _Revealed:
    """Verified SecAgg+, after the reveal: every advertisement the client checked."""

    setup: RoundSetup
    c: secagg_crypto.KeyPair
    s: secagg_crypto.KeyPair
    reveal: bytes
    advertised: dict[int, tuple[bytes, bytes, bytes]]  # client -> (c_pk, s_pk, commitment)
    digest: bytes  # of the advertisements as they were sent (the signed bytes)


@dataclass(frozen=True)
class _Shared:
    setup: RoundSetup
    c: secagg_crypto.KeyPair
    s: secagg_crypto.KeyPair
    peers: dict[int, tuple[bytes, bytes]]  # neighbour that advertised -> (c_pk, s_pk)
    share_keys: dict[int, bytes]  # neighbour -> AES-GCM key (agreed once, used both ways)
    b_seed: bytes
    own: tuple[bytes, bytes]  # this client's own shares of b_u and s_u^SK
    known: frozenset[int] = frozenset()  # verified: the clients whose signed keys it checked


@dataclass(frozen=True)
class _Masked:
    setup: RoundSetup
    held: dict[int, tuple[bytes, bytes]]  # share sender (self included) -> (b share, s share)
    known: frozenset[int] = frozenset()


@dataclass(frozen=True)
class _Signed:
    """Verified rounds, after the consistency check: the survivor set this client signed."""

    setup: RoundSetup
    held: dict[int, tuple[bytes, bytes]]
    survivors: frozenset[int]


_State = _Advertised | _Revealed | _Shared | _Masked | _Signed
_S = TypeVar("_S", _Advertised, _Revealed, _Shared, _Masked, _Signed)


@dataclass
class _Seen:
    """The latest round a client id has begun and the nonces it has seen in that round."""

    round: int
    nonces: set[bytes] = field(default_factory=set)


_SetKey = tuple[int, bytes, bytes, bytes]  # round, nonce and the digests of two byte maps


def fit_task(request: messages.SecAggMaskRequest) -> messages.FitTask:
    """The fit task a masking request carries (what the client trains before it masks)."""
    return messages.FitTask(
        request.round, request.client_id, request.parameters, request.config, request.tensors
    )


class SecAggClient:
    """Answers secure-aggregation requests; ``fit`` trains and returns the plain reply.

    ``random_bytes`` is the key, seed, nonce and coefficient source (``os.urandom``; pass a
    seeded one only in tests). ``identities`` are the long-term keys of the ids this node
    answers for and the registry of every peer's public key: with them the client takes part
    only in verified rounds (see the module docstring); without them, only in the semi-honest
    protocol. ``pins`` are what the client's configuration holds the server to (None: only the
    protocol's own rules).
    """

    def __init__(
        self,
        fit: Fit,
        *,
        random_bytes: secagg_crypto.RandomBytes = os.urandom,
        identities: Identities | None = None,
        pins: Pins | None = None,
    ) -> None:
        self._fit = fit
        self._random = random_bytes
        self.identities = identities
        self.pins = pins
        self.states: dict[int, _State] = {}
        self._seen: dict[int, _Seen] = {}
        self._checked: set[tuple[int, bytes, bytes]] = set()  # (signer, signature, payload)
        # broadcast sets checked this round, by digest: the advertisements, the graph seed of
        # the reveals, the valid signers of a survivor set
        self._advertisements: dict[_SetKey, dict[int, tuple[bytes, bytes, bytes]]] = {}
        self._seeds: dict[_SetKey, int] = {}
        self._signers: dict[tuple[bytes, bytes], frozenset[int]] = {}
        self._checked_round = -1

    def handle(self, request: messages.SecAggMessage) -> messages.SecAggMessage:
        """The reply to one request of any phase."""
        if isinstance(request, messages.SecAggSetup):
            return self.advertise(request)
        if isinstance(request, messages.SecAggRevealRequest):
            return self.reveal(request)
        if isinstance(request, messages.SecAggShareRequest):
            return self.share(request)
        if isinstance(request, messages.SecAggMaskRequest):
            return self.mask(request)
        if isinstance(request, messages.SecAggConsistencyRequest):
            return self.consistency(request)
        if isinstance(request, messages.SecAggUnmaskRequest):
            return self.unmask(request)
        raise messages.MessageError(f"A client cannot answer a {type(request).__name__}.")

    def _state(self, client_id: int, round_: int, kind: type[_S]) -> _S:
        state = self.states.get(client_id)
        if state is None or state.setup.round != round_ or not isinstance(state, kind):
            raise SecAggError(
                f"Client {client_id} has no round {round_} at the step this request needs "
                "(out of order, repeated, or after its state was cleared)."
            )
        return state

    def _verify(self, cid: int, signer: int, signature: bytes, payload: bytes, what: str) -> None:
        """Raise :class:`SecAggError` unless ``signer``'s registered identity signed
        ``payload``; each (signer, signature, payload) is checked once per round."""
        if self.identities is None:
            raise SecAggError(f"Client {cid} has no identities to check signatures with.")
        if (signer, signature, payload) in self._checked:
            return
        identity = self.identities.registry.get(signer)
        if identity is None:
            raise SecAggError(f"Client {cid} knows no identity key of client {signer}.")
        try:
            secagg_crypto.verify(identity, signature, payload, client_id=signer, what=what)
        except secagg_crypto.CryptoError as exc:
            raise SecAggError(f"Client {cid} refuses: {exc}") from None
        self._checked.add((signer, signature, payload))

    def _begin(self, cid: int, setup: RoundSetup) -> None:
        """Refuse an older round or a replayed ``(round, nonce)``; forget finished rounds."""
        if self.identities is not None:
            if not setup.verified:
                raise SecAggError(
                    f"Client {cid} refuses round {setup.round}: it has an identity and takes "
                    "part only in verified rounds (signed keys and a consistency check), which "
                    "this setup does not announce."
                )
            if cid not in self.identities.own:
                raise SecAggError(f"Client {cid} has no identity key on this node.")
        seen = self._seen.get(cid)
        if seen is not None and setup.round < seen.round:
            raise SecAggError(
                f"Client {cid} refuses round {setup.round}: it has begun round {seen.round} "
                "already (a replayed or stale setup)."
            )
        if seen is None or setup.round > seen.round:
            seen = self._seen[cid] = _Seen(setup.round)
        if setup.verified:
            if setup.nonce in seen.nonces:
                raise SecAggError(
                    f"Client {cid} refuses round {setup.round}: its nonce was used before "
                    "(a replayed setup)."
                )
            seen.nonces.add(setup.nonce)
        if setup.round > self._checked_round:  # a later round began: earlier rounds ended
            for other, state in list(self.states.items()):
                if state.setup.round < setup.round:
                    del self.states[other]
            # signatures bind their round: older ones are moot
            self._checked.clear()
            self._advertisements.clear()
            self._seeds.clear()
            self._signers.clear()
            self._checked_round = setup.round

    def advertise(self, request: messages.SecAggSetup) -> messages.SecAggKeys:
        """Phase 0: fresh key pairs ``c`` and ``s`` for this round (and, in verified SecAgg+,
        a commitment to this client's share ``r`` of the graph's randomness), signed."""
        setup = RoundSetup.from_message(request)
        cid = request.client_id
        check_majority(setup)
        if self.pins is not None:
            self.pins.check_setup(setup, cid)
        self._begin(cid, setup)
        c, s = secagg_crypto.key_pair(self._random), secagg_crypto.key_pair(self._random)
        signature = commitment = reveal = b""
        if setup.committed_graph:
            reveal = self._random(secagg_crypto.REVEAL_BYTES)
            commitment = secagg_crypto.commitment(setup.round, setup.nonce, cid, reveal)
        if self.identities is not None:
            payload = secagg_crypto.keys_message(
                setup.round, setup.nonce, cid, c.public, s.public, commitment
            )
            signature = secagg_crypto.sign(self.identities.own[cid], payload)
        self.states[cid] = _Advertised(setup, c, s, reveal)
        return messages.SecAggKeys(setup.round, cid, c.public, s.public, signature, commitment)

    def reveal(self, request: messages.SecAggRevealRequest) -> messages.SecAggReveal:
        """Verified SecAgg+: check every signed advertisement (the commitments are fixed from
        here on), then reveal ``r``."""
        cid, round_ = request.client_id, request.round
        state = self._state(cid, round_, _Advertised)
        setup = state.setup
        if not setup.committed_graph:
            raise SecAggError(f"Client {cid} has no graph randomness to reveal in this round.")
        strangers = sorted(set(request.advertised) - set(setup.sampled))
        if strangers:
            raise SecAggError(
                f"Client {cid} was sent advertisements of clients {strangers}, who were not "
                f"sampled in round {round_}."
            )
        digest = messages.map_digest(request.advertised)
        advertised = self._checked_advertisements(cid, setup, request, digest)
        mine = advertised.get(cid)
        expected = (state.c.public, state.s.public)
        if mine is None or mine[:2] != expected:
            raise SecAggError(
                f"Client {cid}'s own advertisement is missing or altered in the commitments."
            )
        if len(advertised) < setup.quorum:
            raise SecAggError(
                f"Client {cid} was sent {len(advertised)} advertisements, fewer than the "
                f"{setup.quorum} a round needs."
            )
        self.states[cid] = _Revealed(
            setup,
            state.c,
            state.s,
            state.reveal,
            advertised,
            digest,
        )
        return messages.SecAggReveal(round_, cid, state.reveal)

    def _checked_advertisements(
        self, cid: int, setup: RoundSetup, request: messages.SecAggRevealRequest, digest: bytes
    ) -> dict[int, tuple[bytes, bytes, bytes]]:
        """Every advertisement of the request, each signature checked against its sender's
        identity over this round and nonce: ``client -> (c_pk, s_pk, commitment)``; a set this
        node has checked in this round is not checked again. ``digest`` is the advertisements'
        :func:`~fedguard.protocol.messages.map_digest`, which the caller keeps."""
        # The round and nonce are belt and braces: a set checked under another nonce cannot
        # hold this client's own fresh keys, which the caller requires, so its digest differs.
        # The signatures are in the key so that a node refuses a bad one as a device would.
        key = (setup.round, setup.nonce, digest, messages.map_digest(request.signatures))
        known = self._advertisements.get(key)
        if known is not None:
            return known
        key_bytes = secagg_crypto.KEY_BYTES
        advertised: dict[int, tuple[bytes, bytes, bytes]] = {}
        for v, blob in request.advertised.items():
            if len(blob) != 2 * key_bytes + secagg_crypto.DIGEST_BYTES:
                raise SecAggError(f"The advertisement of client {v} has the wrong length.")
            c_pk, s_pk, commitment = blob[:key_bytes], blob[key_bytes:-32], blob[-32:]
            payload = secagg_crypto.keys_message(
                setup.round, setup.nonce, v, c_pk, s_pk, commitment
            )
            self._verify(cid, v, request.signatures.get(v, b""), payload, "advertised keys")
            advertised[v] = (c_pk, s_pk, commitment)
        self._advertisements[key] = advertised
        return advertised

    def share(self, request: messages.SecAggShareRequest) -> messages.SecAggShares:
        """Phase 1: Shamir-share ``b_u`` and ``s_u^SK``; one encrypted bundle per neighbour."""
        cid, round_ = request.client_id, request.round
        state: _Advertised | _Revealed
        known: frozenset[int] = frozenset()
        current = self.states.get(cid)
        if isinstance(current, _Revealed):
            state = self._state(cid, round_, _Revealed)
            setup = self._committed_setup(cid, state, request.reveals)
            known = frozenset(state.advertised)
        else:
            state = self._state(cid, round_, _Advertised)
            setup = state.setup
            if setup.committed_graph:
                raise SecAggError(
                    f"Client {cid} was asked to share before the graph's randomness was revealed."
                )
        peers = self._check_peers(cid, setup, request, state)
        if setup.verified and not known:
            known = frozenset([*peers, cid])
        holders = sorted([*peers, cid])
        if len(holders) < setup.threshold:
            raise SecAggError(
                f"Client {cid} has {len(holders)} share holders left, "
                f"fewer than the threshold {setup.threshold}."
            )
        b_seed = self._random(SECRET_BYTES)
        shares = secagg_shamir.split(
            [b_seed, secagg_crypto.private_bytes(state.s)],
            [setup.points[h] for h in holders],
            setup.threshold,
            self._random,
        )
        ciphertexts: dict[int, bytes] = {}
        commitments: dict[int, bytes] = {}
        share_keys: dict[int, bytes] = {}
        own = (b"", b"")
        for i, holder in enumerate(holders):
            b_share = secagg_shamir.share_to_bytes(shares[0, i])
            s_share = secagg_shamir.share_to_bytes(shares[1, i])
            if setup.verified:
                commitments[holder] = secagg_crypto.share_commitment(
                    round_, setup.nonce, cid, holder, b"b", b_share
                ) + secagg_crypto.share_commitment(round_, setup.nonce, cid, holder, b"s", s_share)
            if holder == cid:
                own = (b_share, s_share)
                continue
            key = secagg_crypto.share_key(state.c.private, peers[holder][0], round_, cid, holder)
            share_keys[holder] = key
            ciphertexts[holder] = secagg_crypto.encrypt_bundle(
                key,
                bundle_plaintext(b_share, s_share),
                round_=round_,
                sender=cid,
                receiver=holder,
                random_bytes=self._random,
            )
        self.states[cid] = _Shared(setup, state.c, state.s, peers, share_keys, b_seed, own, known)
        return messages.SecAggShares(round_, cid, ciphertexts, commitments)

    def _committed_setup(self, cid: int, state: _Revealed, reveals: messages.ByteMap) -> RoundSetup:
        """The setup with the graph seed of the revealed randomness, each reveal checked
        against its signed commitment and this client's own among them."""
        setup = state.setup
        if reveals.get(cid) != state.reveal:
            raise SecAggError(
                f"Client {cid}'s own graph randomness is missing from the reveals it was sent: "
                "the server would choose the graph without it."
            )
        if len(reveals) < setup.quorum:
            raise SecAggError(
                f"Client {cid} was sent {len(reveals)} reveals, fewer than the {setup.quorum} "
                "a round needs."
            )
        key = (
            setup.round,
            setup.nonce,
            state.digest,
            messages.map_digest(reveals),
        )
        seed = self._seeds.get(key)
        if seed is None:
            for v, r in reveals.items():
                committed = state.advertised.get(v)
                if committed is None:
                    raise SecAggError(
                        f"Client {cid} was sent a reveal of client {v}, who committed none."
                    )
                if len(r) != secagg_crypto.REVEAL_BYTES or (
                    secagg_crypto.commitment(setup.round, setup.nonce, v, r) != committed[2]
                ):
                    raise SecAggError(
                        f"Client {cid} was sent a reveal of client {v} that does not match its "
                        "signed commitment."
                    )
            seed = self._seeds[key] = secagg_crypto.graph_seed(setup.round, setup.nonce, reveals)
        return replace(setup, graph_seed=seed)

    def _check_peers(
        self,
        cid: int,
        setup: RoundSetup,
        request: messages.SecAggShareRequest,
        state: _Advertised | _Revealed,
    ) -> dict[int, tuple[bytes, bytes]]:
        neighbours = setup.graph[cid]
        strangers = set(request.public_keys) - neighbours
        if strangers:
            raise SecAggError(
                f"Client {cid} was sent keys of clients {sorted(strangers)}, "
                "who are not its neighbours"
                + (" in the graph the revealed randomness gives." if setup.committed_graph else ".")
            )
        peers: dict[int, tuple[bytes, bytes]] = {}
        for v, keys in request.public_keys.items():
            if len(keys) != 2 * secagg_crypto.KEY_BYTES:
                raise SecAggError(f"The advertised keys of client {v} have the wrong length.")
            c_pk, s_pk = keys[: secagg_crypto.KEY_BYTES], keys[secagg_crypto.KEY_BYTES :]
            if isinstance(state, _Revealed):
                committed = state.advertised.get(v)
                if committed is None or committed[:2] != (c_pk, s_pk):
                    raise SecAggError(
                        f"Client {cid} was sent keys of client {v} other than those it checked."
                    )
            elif setup.verified:
                payload = secagg_crypto.keys_message(setup.round, setup.nonce, v, c_pk, s_pk)
                self._verify(cid, v, request.signatures.get(v, b""), payload, "advertised keys")
            peers[v] = (c_pk, s_pk)
        return peers

    def mask(self, request: messages.SecAggMaskRequest) -> messages.SecAggMaskedInput:
        """Phase 2: decrypt the bundles, train, encode and mask the update."""
        cid, round_ = request.client_id, request.round
        state = self._state(cid, round_, _Shared)
        setup = state.setup
        mechanism = distributed_from_config(request.config)
        if self.pins is not None:
            self.pins.check_distributed(mechanism, cid, round_)
        if mechanism is not None:
            setup = replace(setup, distributed=mechanism)
        held = {cid: state.own}
        for sender, ciphertext in request.ciphertexts.items():
            if sender not in state.peers:
                raise SecAggError(f"Client {cid} got a share bundle from non-peer {sender}.")
            plain = secagg_crypto.decrypt_bundle(
                state.share_keys[sender], ciphertext, round_=round_, sender=sender, receiver=cid
            )
            held[sender] = split_bundle(plain, SHARE_BYTES, sender)
        if len(held) < setup.threshold:
            raise SecAggError(
                f"Client {cid} holds shares of {len(held)} clients, "
                f"fewer than the threshold {setup.threshold}."
            )
        reply = self._fit(fit_task(request))
        update = reply.update.detach().numpy()
        if mechanism is not None:  # the noise must be secret: seeded from this client's entropy
            secret = np.random.default_rng(np.frombuffer(self._random(32), dtype="<u4"))
            encoded = distributed_dp.encode(update, setup.fixed_point, mechanism, secret)
        else:
            seed = messages.config_int(request.config, "seed", 0)
            weight = reply.num_examples if setup.weighted else 1
            encoded = secagg_quantize.encode(
                update, weight, setup.fixed_point, np.random.default_rng([seed, 0x5EC])
            )
        masked = self._add_masks(cid, encoded, state, sorted(set(held) - {cid}))
        self.states[cid] = _Masked(setup, held, state.known)  # setup.min_inputs: noise shares
        signed = masked.view(np.int32 if masked.dtype.itemsize == 4 else np.int64)
        return messages.SecAggMaskedInput(round_, cid, torch.from_numpy(signed))

    @staticmethod
    def _add_masks(
        cid: int, encoded: np.ndarray, state: _Shared, partners: list[int]
    ) -> np.ndarray:
        """``x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` in the ring,
        computed in place in ``encoded`` (the client's own fresh encoding)."""
        setup = state.setup
        if encoded.shape != (setup.dim + 1,):
            raise SecAggError(
                f"Client {cid} encoded {encoded.shape[0]} values, expected {setup.dim + 1}."
            )
        secagg_crypto.add_mask(encoded, state.b_seed)
        secagg_crypto.add_pairwise_masks(
            encoded,
            owner=cid,
            private=state.s.private,
            peer_publics={v: state.peers[v][1] for v in partners},
            round_=setup.round,
        )
        encoded &= secagg_crypto.ring_mask(setup.bits)
        return encoded

    def consistency(
        self, request: messages.SecAggConsistencyRequest
    ) -> messages.SecAggConsistencySignature:
        """Verified rounds: sign the survivor set ``U3`` the server reports, if it is one this
        client can believe (it is in it, it knows every member, it has at least the quorum)."""
        cid, round_ = request.client_id, request.round
        state = self._state(cid, round_, _Masked)
        setup = state.setup
        if self.identities is None or not setup.verified:
            raise SecAggError(f"Client {cid} signs survivor sets only in verified rounds.")
        survivors = frozenset(request.survivors)
        if cid not in survivors:
            raise SecAggError(
                f"Client {cid} sent its masked input but is not among the survivors it is "
                "asked to sign."
            )
        strangers = sorted(survivors - state.known)
        if strangers:
            raise SecAggError(
                f"Client {cid} is asked to sign survivors {strangers} whose keys it never "
                "checked; it refuses."
            )
        if len(survivors) < setup.quorum:
            raise SecAggError(
                f"Client {cid} is asked to sign {len(survivors)} survivors, fewer than the "
                f"quorum of {setup.quorum}; it refuses."
            )
        payload = secagg_crypto.survivors_message(
            round_, setup.nonce, setup.transcript, sorted(survivors)
        )
        signature = secagg_crypto.sign(self.identities.own[cid], payload)
        self.states[cid] = _Signed(setup, state.held, survivors)
        return messages.SecAggConsistencySignature(round_, cid, signature)

    def _check_signatures(
        self, cid: int, state: _Signed, request: messages.SecAggUnmaskRequest
    ) -> None:
        """Raise unless ``alive`` is the set this client signed and the quorum of distinct
        survivors signed that same set in this round (invalid signatures count for nothing)."""
        setup = state.setup
        if set(request.alive) != state.survivors:
            raise SecAggError(
                f"Client {cid} signed the survivors {sorted(state.survivors)} but is asked to "
                f"unmask for {sorted(request.alive)}; it refuses to unmask."
            )
        payload = secagg_crypto.survivors_message(
            request.round, setup.nonce, setup.transcript, sorted(state.survivors)
        )
        key = (hashlib.sha256(payload).digest(), messages.map_digest(request.signatures))
        signers = self._signers.get(key)
        if signers is None:
            valid: set[int] = set()
            for v in sorted(state.survivors & set(request.signatures)):
                if len(valid) == setup.quorum:
                    break  # the quorum is all it needs: the rest need not be checked
                try:
                    self._verify(cid, v, request.signatures[v], payload, "survivor set")
                except SecAggError:
                    continue
                valid.add(v)
            signers = self._signers[key] = frozenset(valid)
        valid_count = len(signers)
        if valid_count < setup.quorum:
            raise SecAggError(
                f"Client {cid} holds {valid_count} valid signatures over the survivor set it was "
                f"sent, fewer than the quorum of {setup.quorum}: the survivors may have been told "
                "different sets; it refuses to unmask."
            )

    def unmask(self, request: messages.SecAggUnmaskRequest) -> messages.SecAggUnmaskReply:
        """Phase 3: ``b`` shares of alive peers, ``s`` shares of dropped ones, never both."""
        cid, round_ = request.client_id, request.round
        current = self.states.get(cid)
        state: _Masked | _Signed
        if self.identities is not None or isinstance(current, _Signed):
            state = self._state(cid, round_, _Signed)
            self._check_signatures(cid, state, request)
        else:
            state = self._state(cid, round_, _Masked)
            if state.setup.verified:
                raise SecAggError(
                    f"Client {cid} is asked to unmask a verified round without the consistency "
                    "check; it refuses to unmask."
                )
        alive, dropped = set(request.alive), set(request.dropped)
        both = sorted(alive & dropped)
        if both:
            raise SecAggError(
                f"Client {cid} refuses to reveal both shares of client {both[0]}: "
                "together they would unmask its input."
            )
        strangers = sorted((alive | dropped) - set(state.setup.sampled))
        if strangers:
            raise SecAggError(
                f"Client {cid} is asked to unmask for clients {strangers}, who were not sampled "
                f"in round {round_}; it refuses to unmask."
            )
        if cid not in alive:
            raise SecAggError(f"Client {cid} is asked to unmask but is not listed alive.")
        held = set(state.held)
        reported = (alive | dropped) & state.setup.holders(cid)
        if reported != held:
            raise SecAggError(
                f"Client {cid} exchanged shares with {sorted(held)}, but the server reports "
                f"{sorted(reported)} among its holders; it refuses to unmask."
            )
        if len(alive & held) < state.setup.threshold:
            raise SecAggError(
                f"Client {cid} sees {len(alive & held)} alive share holders, fewer than the "
                f"threshold {state.setup.threshold}; it refuses to unmask."
            )
        if len(alive) < state.setup.min_inputs:
            raise SecAggError(
                f"Client {cid} is asked to unmask a sum of {len(alive)} inputs, fewer than the "
                f"{state.setup.min_inputs} whose noise the privacy guarantee counts on."
            )
        if self.pins is not None and len(alive) < self.pins.min_inputs:
            raise SecAggError(
                f"Client {cid} is asked to unmask a sum of {len(alive)} inputs, fewer than the "
                f"{self.pins.min_inputs} its configuration needs; it refuses to unmask."
            )
        del self.states[cid]
        return messages.SecAggUnmaskReply(
            round=round_,
            client_id=cid,
            b_shares={v: state.held[v][0] for v in sorted(alive & held)},
            s_shares={v: state.held[v][1] for v in sorted(dropped & held)},
        )
