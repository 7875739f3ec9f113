"""The client half of aggregation under homomorphic encryption: encrypt, and decrypt a sum.

See :mod:`fedguard.protocol.he`. An :class:`HEClient` answers the two request kinds for any
number of client ids (the simulator serves all of them from one object, a deployed client only
its own) with the federation's secret key. It refuses (:class:`~fedguard.protocol.he.HEProtocolError`,
sending nothing):

* any request without a key, or of another scheme than its key's;
* an encrypt request that asks for less than its ``pins`` (its own configuration's settings):
  a larger clip, a weighted sum where it sums unweighted, less distributed DP noise or other
  noise shares; and, with an identity, one without a nonce or with a nonce it has seen;
* a decrypt request for a round it did not encrypt in, a second one for the same round (the
  server gets one plaintext per round from each decryptor), or one whose survivor set does not
  contain it or is smaller than its ``min_inputs``.

These checks do not stop a malicious server from sending a single client's ciphertext as the
"sum": a decryptor cannot tell (the threat model in :mod:`fedguard.protocol.he`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedguard.algorithms.he import encryption
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.protocol import he, messages
from fedguard.protocol.secagg import Identities, distributed_from_config

Fit = Callable[[messages.FitTask], messages.FitReply]
RandomBytes = Callable[[int], bytes]


def fit_task(request: messages.HeEncryptRequest) -> messages.FitTask:
    """The fit task an encrypt request carries (what the client trains before it encrypts)."""
    return messages.FitTask(
        request.round, request.client_id, request.parameters, request.config, request.tensors
    )


class HEClient:
    """Answers HE requests with the federation's secret ``key`` (a TenSEAL context; None: a
    client without the key, which refuses them); ``fit`` trains and returns the plain reply.

    ``identities``: the long-term keys of the ids this node answers for (it then signs its
    ciphertexts and takes part only in verified rounds); ``pins``: the run's HE settings as its
    own configuration states them, and ``min_inputs`` the fewest contributors of a sum it
    decrypts.
    """

    def __init__(
        self,
        fit: Fit,
        key: Any = None,
        *,
        identities: Identities | None = None,
        pins: he.Settings | None = None,
        min_inputs: int = 1,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if key is not None and not encryption.can_decrypt(key):
            raise ValueError("An HE client's key context must hold the secret key.")
        self._fit = fit
        self._key = key
        self.identities = identities
        self.pins = pins
        self.min_inputs = min_inputs
        self._random = random_bytes
        self._encrypted: dict[int, int] = {}  # client id -> latest round it encrypted in
        self._bits: dict[int, int] = {}  # client id -> the ring bits of that round's encoding
        self._decrypted: dict[int, int] = {}  # client id -> latest round it decrypted
        self._nonces: set[tuple[int, bytes]] = set()  # (client id, nonce) signed

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def set_key(self, key: Any) -> None:
        """Hold ``key`` (a context with the secret key) from now on."""
        if not encryption.can_decrypt(key):
            raise ValueError("An HE client's key context must hold the secret key.")
        self._key = key

    def handle(self, request: messages.HeMessage) -> messages.HeMessage:
        """The reply to one HE request."""
        if isinstance(request, messages.HeEncryptRequest):
            return self.encrypt(request)
        if isinstance(request, messages.HeDecryptRequest):
            return self.decrypt(request)
        raise messages.MessageError(f"A client cannot answer a {type(request).__name__}.")

    def _params(self, cid: int, round_: int, scheme: str) -> encryption.Params:
        if self._key is None:
            raise he.HEProtocolError(
                f"Client {cid} refuses round {round_}: it holds no HE key (give it the key file "
                "that fedguard he-keys wrote)."
            )
        if self.pins is not None and scheme != self.pins.scheme:
            raise he.HEProtocolError(
                f"Client {cid} refuses round {round_}: scheme {scheme}, its configuration uses "
                f"{self.pins.scheme}."
            )
        return encryption.PARAMS[scheme]

    def _check_pins(self, request: messages.HeEncryptRequest) -> None:
        cid, round_ = request.client_id, request.round
        prefix = f"Client {cid} refuses round {round_}:"
        if self.identities is not None:
            if cid not in self.identities.own:
                raise he.HEProtocolError(f"Client {cid} has no identity key on this node.")
            if not request.nonce:
                raise he.HEProtocolError(
                    f"{prefix} it has an identity and signs only verified rounds (with a nonce)."
                )
            if (cid, request.nonce) in self._nonces:
                raise he.HEProtocolError(f"{prefix} its nonce was used before (a replay).")
        if request.round <= self._encrypted.get(cid, -1):
            raise he.HEProtocolError(f"{prefix} it has encrypted in round {self._encrypted[cid]}.")
        mechanism = distributed_from_config(request.config)
        pins = self.pins
        if pins is None:
            return
        if not request.clip_norm <= pins.clip_norm:
            raise he.HEProtocolError(
                f"{prefix} clip norm {request.clip_norm:g}, its configuration allows at most "
                f"{pins.clip_norm:g}."
            )
        if request.weighted and not pins.weighted:
            raise he.HEProtocolError(
                f"{prefix} a weighted sum, its configuration sums unweighted updates."
            )
        pinned = pins.distributed
        if pinned is not None and (
            mechanism is None
            or mechanism.noise_multiplier < pinned.noise_multiplier
            or mechanism.noise_clients != pinned.noise_clients
        ):
            raise he.HEProtocolError(
                f"{prefix} the fit task's distributed DP noise is less than (or shared otherwise "
                "than) its configuration's."
            )

    def encrypt(self, request: messages.HeEncryptRequest) -> messages.HeEncrypted:
        """Train, clip, weight, encode and encrypt the update; sign the ciphertexts."""
        cid, round_ = request.client_id, request.round
        params = self._params(cid, round_, request.scheme)
        self._check_pins(request)
        mechanism = distributed_from_config(request.config)
        if mechanism is not None and request.scheme != he.BFV:
            raise he.HEProtocolError(
                f"Client {cid} refuses round {round_}: distributed DP needs the BFV scheme."
            )
        reply = self._fit(fit_task(request))
        update = reply.update.detach().numpy()
        weight = reply.num_examples if request.weighted else 1
        if request.scheme == he.BFV:
            try:
                fp = he.encoding(
                    request.bits, request.clip_norm, request.cohort, request.max_weight, mechanism
                )
            except ValueError as exc:
                raise he.HEProtocolError(
                    f"Client {cid}: the round's encoding is invalid: {exc}"
                ) from None
            if mechanism is not None:  # the noise must be secret: seeded from this client's entropy
                generator = np.random.default_rng(np.frombuffer(self._random(32), dtype="<u4"))
            else:
                seed = messages.config_int(request.config, "seed", 0)
                generator = np.random.default_rng([seed, 0x5EC])
            values = he.encode_bfv(update, weight, fp, mechanism, generator)
        else:
            values = he.encode_ckks(update, weight, request.clip_norm, request.max_weight)
        blobs = encryption.encrypt(self._key, params, values)
        signature = b""
        if self.identities is not None:
            payload = encryption.ciphertexts_message(round_, request.nonce, cid, blobs)
            signature = secagg_crypto.sign(self.identities.own[cid], payload)
            self._nonces.add((cid, request.nonce))
        self._encrypted[cid] = round_
        self._bits[cid] = request.bits
        return messages.HeEncrypted(round_, cid, dict(enumerate(blobs)), signature)

    def decrypt(self, request: messages.HeDecryptRequest) -> messages.HeDecrypted:
        """Decrypt the round's summed ciphertexts (once per round, a round it encrypted in)."""
        cid, round_ = request.client_id, request.round
        params = self._params(cid, round_, request.scheme)
        prefix = f"Client {cid} refuses to decrypt round {round_}:"
        if self._encrypted.get(cid) != round_:
            raise he.HEProtocolError(f"{prefix} it did not encrypt an update in that round.")
        if self._decrypted.get(cid) == round_:
            raise he.HEProtocolError(f"{prefix} it decrypted that round's sum already.")
        survivors = set(request.survivors)
        if cid not in survivors or len(survivors) < self.min_inputs:
            raise he.HEProtocolError(
                f"{prefix} a sum of {len(survivors)} clients (itself "
                f"{'in' if cid in survivors else 'not in'} it), it decrypts sums of at least "
                f"{self.min_inputs} that include its own update."
            )
        blobs = [request.ciphertexts[i] for i in sorted(request.ciphertexts)]
        try:
            plain = encryption.decrypt(self._key, params, blobs, request.dim + 1)
        except encryption.HEError as exc:
            raise he.HEProtocolError(f"{prefix} {exc}") from None
        self._decrypted[cid] = round_
        wire = he.wire_plain(plain, params.scheme, self._bits[cid])
        if request.digest_only:
            empty = torch.zeros(0, dtype=torch.from_numpy(wire[:0]).dtype)
            return messages.HeDecrypted(round_, cid, empty, he.plain_digest(wire))
        return messages.HeDecrypted(round_, cid, torch.from_numpy(wire))
