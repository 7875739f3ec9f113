"""The server half of aggregation under homomorphic encryption: two exchanges, then the sum.

See :mod:`fedguard.protocol.he` for the protocol and its threat model. :func:`homomorphic_sum`
runs one round with a context that holds the scheme's parameters and no secret key: it cannot
decrypt anything, only load and add ciphertexts. A reply is excluded, and its client named in the
round's problems and the log, when it fails or times out, does not decode, is for another client
or round, has another number of ciphertexts than the round's vector needs, holds a ciphertext that
does not load under the round's parameters or holds another number of values than its place, or
(in a verified round, with the federation's identities) carries a signature that does not verify
over the round, its nonce, the client and the digest of exactly these ciphertexts. Excluded
replies are never added, so the others' sum stays exact.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedguard.algorithms.he import encryption
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.protocol import he, messages
from fedguard.protocol.ledger import RoundLedger
from fedguard.protocol.secagg import Identities, SecAggAbortedError
from fedguard.protocol.secagg_server import SecureSum
from fedguard.protocol.transport import Transport

log = logging.getLogger("fedguard.round")

EncryptRequest = Callable[[int], messages.HeEncryptRequest]


def _abort(ledger: RoundLedger, reason: str) -> SecAggAbortedError:
    """The error that ends an HE round that cannot complete, with the round's metrics."""
    return SecAggAbortedError(
        f"Round {ledger.round}: HE aggregation aborted: {reason}; nothing was applied.",
        ledger.metrics(0),
    )


def homomorphic_sum(
    transport: Transport,
    settings: he.Settings,
    context: Any,
    *,
    round_: int,
    sampled: list[int],
    dim: int,
    encrypt_request: EncryptRequest,
    deadline_s: float | None = None,
    min_survivors: int = 1,
    identities: Identities | None = None,
    nonce: bytes = b"",
    choice_seed: int = 0,
) -> SecureSum:
    """One HE round over ``transport`` with ``sampled`` clients: the decrypted, decoded sum.

    ``context`` must not hold the secret key (ValueError otherwise: the server must not be able
    to decrypt). ``encrypt_request(client_id)`` builds a client's request. A round with a
    ``nonce`` and ``identities`` is verified: every reply must carry a valid signature. Fewer than
    ``min_survivors`` good replies (or distributed DP's noise shares), or fewer clients able to
    decrypt than ``settings.decryptors``, abort with :class:`SecAggAbortedError`.
    """
    if encryption.can_decrypt(context):
        raise ValueError("The server's HE context holds the secret key; it must hold none.")
    if nonce and identities is None:
        raise ValueError("A verified HE round needs the clients' registered identities.")
    params = settings.params
    length = dim + 1
    ledger = RoundLedger(round_, len(sampled), "HE", verb="excluded")
    fp = settings.fixed_point(len(sampled)) if settings.scheme == he.BFV else None
    requests = {cid: messages.encode(encrypt_request(cid)) for cid in sampled}
    ledger.bytes_down += sum(len(p) for p in requests.values())
    total: list[Any] | None = None
    contributors: list[int] = []
    for outcome in transport.exchange(requests, deadline_s=deadline_s):
        reply = ledger.receive("encrypt", outcome, messages.HeEncrypted, rejected=True)
        if reply is None:
            continue
        cid = reply.client_id
        vectors, problem = _check_encrypted(reply, params, context, length, nonce, identities)
        if vectors is None:
            ledger.drop("encrypt", cid, problem, rejected=True)
            continue
        total = encryption.add(total, vectors)
        contributors.append(cid)
    least = max(
        min_survivors, 1 if settings.distributed is None else settings.distributed.noise_clients
    )
    if total is None or len(contributors) < least:
        raise _abort(
            ledger, f"{len(contributors)} encrypted updates arrived, the round needs {least}"
        )
    if len(contributors) < settings.decryptors:
        raise _abort(
            ledger,
            f"{len(contributors)} contributing clients left, the round needs "
            f"{settings.decryptors} decryptors",
        )
    summed = encryption.serialize(total)
    plain = _decrypt(
        transport, settings, summed, sorted(contributors), dim, ledger, deadline_s, choice_seed
    )
    if fp is not None:  # BFV
        decoded = he.decode_bfv(plain, fp)
    else:
        decoded = he.decode_ckks(plain, settings.max_weight if settings.weighted else 1)
    log.info(
        "round %d: HE sum of %d clients (%s) decrypted by %d client(s)",
        round_,
        len(contributors),
        settings.scheme,
        settings.decryptors,
    )
    return SecureSum(
        decoded.total,
        decoded.weight,
        sorted(contributors),
        ledger.metrics(len(contributors)),
        ledger.problems,
    )


def _check_encrypted(
    reply: messages.HeEncrypted,
    params: encryption.Params,
    context: Any,
    length: int,
    nonce: bytes,
    identities: Identities | None,
) -> tuple[list[Any] | None, str]:
    """The loaded ciphertexts of one decoded reply, or None and why it is excluded."""
    cid, round_ = reply.client_id, reply.round
    count = params.ciphertexts(length)
    if list(reply.ciphertexts) != list(range(count)):
        return None, f"{len(reply.ciphertexts)} ciphertexts, expected {count} keyed 0..{count - 1}"
    blobs = [reply.ciphertexts[i] for i in range(count)]
    if nonce and identities is not None:
        identity = identities.registry.get(cid)
        if identity is None:
            return None, "no registered identity"
        signed = encryption.ciphertexts_message(round_, nonce, cid, blobs)
        try:
            secagg_crypto.verify(
                identity, reply.signature, signed, client_id=cid, what="ciphertexts"
            )
        except secagg_crypto.CryptoError as exc:
            return None, f"bad signature: {exc}"
    try:
        return encryption.load(context, params, blobs, length), ""
    except encryption.HEError as exc:
        return None, f"malformed ciphertexts: {exc}"


def _decrypt(
    transport: Transport,
    settings: he.Settings,
    summed: list[bytes],
    contributors: list[int],
    dim: int,
    ledger: RoundLedger,
    deadline_s: float | None,
    choice_seed: int,
) -> np.ndarray:
    """The plaintext sum from the first of ``settings.decryptors`` contributors and, with two,
    the digest of the same plaintext from the second (a failed one is replaced by another
    contributor while any is left); a digest that does not match the plaintext aborts the round:
    one of the two lies."""
    candidates = list(contributors)
    random.Random(choice_seed).shuffle(candidates)
    round_ = ledger.round
    ciphertexts = dict(enumerate(summed))
    plain: tuple[int, np.ndarray] | None = None
    digests: dict[int, bytes] = {}
    dtype = he.plain_dtype(settings.scheme, settings.bits)
    while plain is None or len(digests) < settings.decryptors - 1:
        wanted = (plain is None) + (settings.decryptors - 1 - len(digests))
        asked, candidates = candidates[:wanted], candidates[wanted:]
        if not asked:
            answered = len(digests) + (plain is not None)
            raise _abort(
                ledger,
                f"{answered} of the {settings.decryptors} decryptors answered and no "
                "contributing client is left to ask",
            )
        digest_only = {cid: plain is not None or i > 0 for i, cid in enumerate(asked)}
        requests: Mapping[int, bytes] = {
            cid: messages.encode(
                messages.HeDecryptRequest(
                    round_, cid, ciphertexts, contributors, settings.scheme, dim, digest_only[cid]
                )
            )
            for cid in asked
        }
        ledger.bytes_down += sum(len(p) for p in requests.values())
        for outcome in transport.exchange(requests, deadline_s=deadline_s):
            reply = ledger.receive("decrypt", outcome, messages.HeDecrypted)
            if reply is None:
                continue
            cid = reply.client_id
            wrong = None
            shape = (0,) if digest_only[cid] else (dim + 1,)
            if reply.plain.dtype != dtype or tuple(reply.plain.shape) != shape:
                wrong = (
                    f"plaintext of {reply.plain.dtype} {tuple(reply.plain.shape)}, expected "
                    f"{dtype} {shape}"
                )
            if wrong is None and digest_only[cid] != (len(reply.digest) > 0):
                wrong = "a digest where a plaintext was asked for, or none where one was"
            if wrong is not None:
                ledger.drop("decrypt", cid, wrong)
                continue
            if digest_only[cid]:
                digests[cid] = reply.digest
            else:
                plain = (cid, reply.plain.numpy())
    first, answer = plain
    expected = he.plain_digest(answer)
    for other, digest in sorted(digests.items()):
        if digest != expected:
            for cid in (first, other):
                ledger.problems.append((cid, "decrypt: the decryptors' plaintexts differ"))
            raise _abort(
                ledger,
                f"decryptors {first} and {other} returned different plaintexts of the same sum "
                "(one of them lies)",
            )
    return answer
