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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.algorithms.privacy import distributed_dp
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.algorithms.secagg import shamir as secagg_shamir
from fedguard.protocol import messages
from fedguard.protocol.secagg import (
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


@dataclass(frozen=True)
class _Shared:
    setup: RoundSetup
    c: secagg_crypto.KeyPair
    s: secagg_crypto.KeyPair
    peers: dict[int, tuple[bytes, bytes]]  # neighbour that advertised -> (c_pk, s_pk)
    share_keys: dict[int, bytes]  # neighbour -> AES-GCM key (agreed once, used both ways)
    b_seed: bytes
    own: tuple[bytes, bytes]  # this client's own shares of b_u and s_u^SK


@dataclass(frozen=True)
class _Masked:
    setup: RoundSetup
    held: dict[int, tuple[bytes, bytes]]  # share sender (self included) -> (b share, s share)


_State = _Advertised | _Shared | _Masked
_S = TypeVar("_S", _Advertised, _Shared, _Masked)


def fit_task(request: messages.SecAggMaskRequest) -> messages.FitTask:
    """The fit task a masking request carries (what the client trains before it masks)."""
    return messages.FitTask(
        request.round, request.client_id, request.parameters, request.config, request.tensors
    )


class SecAggClient:
    """Answers secure-aggregation requests; ``fit`` trains and returns the plain reply.

    ``random_bytes`` is the key, seed, nonce and coefficient source (``os.urandom``; pass a
    seeded one only in tests). ``identity`` signs this node's advertised keys, and
    ``peer_identities`` are the public keys its peers' advertisements must verify against
    (both off in simulation). ``pins`` are what the client's configuration holds the server to
    (None: only the protocol's own rules).
    """

    def __init__(
        self,
        fit: Fit,
        *,
        random_bytes: secagg_crypto.RandomBytes = os.urandom,
        identity: ed25519.Ed25519PrivateKey | None = None,
        peer_identities: Mapping[int, ed25519.Ed25519PublicKey] | None = None,
        pins: Pins | None = None,
    ) -> None:
        self._fit = fit
        self._random = random_bytes
        self._identity = identity
        self._peer_identities = peer_identities
        self.pins = pins
        self.states: dict[int, _State] = {}

    def handle(self, request: messages.SecAggMessage) -> messages.SecAggMessage:
        """The reply to one request of phases 0-3."""
        if isinstance(request, messages.SecAggSetup):
            return self.advertise(request)
        if isinstance(request, messages.SecAggShareRequest):
            return self.share(request)
        if isinstance(request, messages.SecAggMaskRequest):
            return self.mask(request)
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

    def advertise(self, request: messages.SecAggSetup) -> messages.SecAggKeys:
        """Phase 0: fresh key pairs ``c`` and ``s`` for this round."""
        setup = RoundSetup.from_message(request)
        cid = request.client_id
        check_majority(setup)
        if self.pins is not None:
            self.pins.check_setup(setup, cid)
        for other, state in list(self.states.items()):
            if state.setup.round < setup.round:
                del self.states[other]  # a later round began: earlier rounds ended
        c, s = secagg_crypto.key_pair(self._random), secagg_crypto.key_pair(self._random)
        signature = b""
        if self._identity is not None:
            payload = secagg_crypto.keys_message(setup.round, cid, c.public, s.public)
            signature = secagg_crypto.sign(self._identity, payload)
        self.states[cid] = _Advertised(setup, c, s)
        return messages.SecAggKeys(setup.round, cid, c.public, s.public, signature)

    def share(self, request: messages.SecAggShareRequest) -> messages.SecAggShares:
        """Phase 1: Shamir-share ``b_u`` and ``s_u^SK``; one encrypted bundle per neighbour."""
        cid, round_ = request.client_id, request.round
        state = self._state(cid, round_, _Advertised)
        setup = state.setup
        peers = self._check_peers(cid, setup, request)
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
        share_keys: dict[int, bytes] = {}
        own = (b"", b"")
        for i, holder in enumerate(holders):
            b_share = secagg_shamir.share_to_bytes(shares[0, i])
            s_share = secagg_shamir.share_to_bytes(shares[1, i])
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
        self.states[cid] = _Shared(setup, state.c, state.s, peers, share_keys, b_seed, own)
        return messages.SecAggShares(round_, cid, ciphertexts)

    def _check_peers(
        self, cid: int, setup: RoundSetup, request: messages.SecAggShareRequest
    ) -> dict[int, tuple[bytes, bytes]]:
        neighbours = setup.graph[cid]
        strangers = set(request.public_keys) - neighbours
        if strangers:
            raise SecAggError(
                f"Client {cid} was sent keys of clients {sorted(strangers)}, "
                "who are not its neighbours."
            )
        peers: dict[int, tuple[bytes, bytes]] = {}
        for v, keys in request.public_keys.items():
            if len(keys) != 2 * secagg_crypto.KEY_BYTES:
                raise SecAggError(f"The advertised keys of client {v} have the wrong length.")
            c_pk, s_pk = keys[: secagg_crypto.KEY_BYTES], keys[secagg_crypto.KEY_BYTES :]
            if self._peer_identities is not None:
                identity = self._peer_identities.get(v)
                if identity is None:
                    raise SecAggError(f"Client {cid} knows no identity key of client {v}.")
                payload = secagg_crypto.keys_message(setup.round, v, c_pk, s_pk)
                signature = request.signatures.get(v, b"")
                secagg_crypto.verify(identity, signature, payload, client_id=v)
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
        self.states[cid] = _Masked(setup, held)  # setup.min_inputs: noise shares needed
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

    def unmask(self, request: messages.SecAggUnmaskRequest) -> messages.SecAggUnmaskReply:
        """Phase 3: ``b`` shares of alive peers, ``s`` shares of dropped ones, never both."""
        cid, round_ = request.client_id, request.round
        state = self._state(cid, round_, _Masked)
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
