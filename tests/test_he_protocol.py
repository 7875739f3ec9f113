"""Aggregation under homomorphic encryption: the protocol's two halves over the in-process transport.

Every expected sum is computed here with NumPy from the clients' own updates (clipped, weighted),
independently of the protocol's encoding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
import pytest
import tenseal as ts
import torch

from fedguard.algorithms.he import encryption
from fedguard.protocol import he, he_client, he_server, messages, secagg
from fedguard.protocol.secagg import Phase, SecAggAbortedError
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

N, DIM, CLIP, MAX_W = 6, 5000, 2.0, 64
NONCE = bytes(range(32))


def _updates() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {c: rng.normal(0, 0.05, DIM).astype(np.float32) for c in range(N)}
    out[2] = out[2] * 400  # norm about 141: clipped to CLIP
    return out


UPDATES = _updates()
WEIGHTS = {c: 10 + 7 * c for c in range(N)}


def _fit(task: messages.FitTask) -> messages.FitReply:
    cid = task.client_id
    return messages.FitReply(task.round, cid, torch.from_numpy(UPDATES[cid]), WEIGHTS[cid])


def _reference(clients: list[int]) -> tuple[np.ndarray, int]:
    """The weighted sum of the clipped updates of ``clients``, by NumPy alone."""
    total = np.zeros(DIM)
    for c in clients:
        x = UPDATES[c].astype(np.float64)
        norm = np.linalg.norm(x)
        if norm > CLIP:
            x = x * (CLIP / norm)
        total += WEIGHTS[c] * x
    return total, sum(WEIGHTS[c] for c in clients)


def _federation(scheme: str, identities: secagg.Identities | None = None):
    key = encryption.secret_context(encryption.PARAMS[scheme])
    server_ctx = encryption.context_from_bytes(encryption.server_bytes(key), secret=False)
    client = he_client.HEClient(_fit, key, identities=identities)
    return key, server_ctx, client


def _run(
    scheme: str,
    transport_of: Callable[[he_client.HEClient], object] | None = None,
    *,
    decryptors: int = 2,
    identities: secagg.Identities | None = None,
    handler_wrap: Callable | None = None,
):
    key, server_ctx, client = _federation(scheme, identities)
    settings = he.Settings(scheme, clip_norm=CLIP, max_weight=MAX_W, decryptors=decryptors)

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(client.handle(messages.decode(payload)))

    h = handler if handler_wrap is None else handler_wrap(handler)
    transport = InProcessTransport(h, list(range(N)))
    if transport_of is not None:
        transport = transport_of(transport)
    nonce = NONCE if identities is not None else b""

    def request(cid: int) -> messages.HeEncryptRequest:
        return settings.request(1, cid, N, torch.zeros(DIM), {"seed": cid}, {}, nonce)

    result = he_server.homomorphic_sum(
        transport,
        settings,
        server_ctx,
        round_=1,
        sampled=list(range(N)),
        dim=DIM,
        encrypt_request=request,
        identities=None if identities is None else identities.public(),
        nonce=nonce,
    )
    return result, key, server_ctx


# BFV: exact up to fixed-point rounding (step 1/scale per client and weight); CKKS: its noise
# (measured about 1e-6 per entry at scale 2^30, times the weight cap when decoded).
TOLERANCE = {"bfv": 1e-4, "ckks": 5e-3}


@pytest.mark.parametrize("scheme", ["bfv", "ckks"])
@pytest.mark.parametrize("dropped", [(), (4,), (1, 4, 5)])
def test_the_decrypted_sum_equals_numpy_with_dropouts(
    scheme: str, dropped: tuple[int, ...]
) -> None:
    """0, 1 and the most dropouts two decryptors tolerate among 6 (3 of them: any 2 left
    contributors can decrypt; here 3 remain)."""
    result, _, _ = _run(scheme, lambda t: PhaseDropout(t, {Phase.MASK: dropped}))
    alive = [c for c in range(N) if c not in dropped]
    total, weight = _reference(alive)
    assert result.survivors == alive
    assert result.weight == weight
    err = float(np.abs(result.total - total).max())
    assert err < TOLERANCE[scheme], err
    assert float(np.abs(total).max()) > 1.0  # a real sum, not near zero
    assert {c for c, _ in result.problems} == set(dropped)


def test_the_largest_dropout_tolerated_and_one_more_aborts() -> None:
    """Two decryptors need two contributors: 4 of 6 dropped still completes, 5 aborts."""
    result, _, _ = _run("bfv", lambda t: PhaseDropout(t, {Phase.MASK: (0, 1, 2, 3)}))
    total, weight = _reference([4, 5])
    assert result.weight == weight and float(np.abs(result.total - total).max()) < 1e-4
    with pytest.raises(SecAggAbortedError, match="needs 2 decryptors"):
        _run("bfv", lambda t: PhaseDropout(t, {Phase.MASK: (0, 1, 2, 3, 4)}))
    one, _, _ = _run("bfv", lambda t: PhaseDropout(t, {Phase.MASK: (0, 1, 2, 3, 4)}), decryptors=1)
    assert one.survivors == [5] and one.weight == WEIGHTS[5]


def test_a_decryptor_that_drops_is_replaced() -> None:
    # the decryptors are chosen at random; every client but 3 drops before decrypting, so the
    # round needs a replacement whenever 3 was not among the first two chosen
    result, _, _ = _run(
        "bfv", lambda t: PhaseDropout(t, {Phase.UNMASK: (0, 1, 2, 4)}), decryptors=1
    )
    total, _ = _reference(list(range(N)))
    assert result.survivors == list(range(N))
    assert float(np.abs(result.total - total).max()) < 1e-4


def test_the_server_context_cannot_decrypt() -> None:
    key, server_ctx, client = _federation("bfv")
    blobs = encryption.encrypt(key, encryption.BFV, np.arange(-50, 50))
    vector = ts.bfv_vector_from(server_ctx, blobs[0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()  # TenSEAL itself refuses: the context holds no secret key
    assert not encryption.can_decrypt(server_ctx)
    with pytest.raises(ValueError, match="secret key"):
        encryption.decrypt(server_ctx, encryption.BFV, blobs, 100)
    # the key holder can: the ciphertext is a real one
    assert np.array_equal(encryption.decrypt(key, encryption.BFV, blobs, 100), np.arange(-50, 50))
    with pytest.raises(ValueError, match="holds the secret key"):
        he_server.homomorphic_sum(
            InProcessTransport(lambda c, p: p, [0, 1]),
            he.Settings("bfv", clip_norm=1.0, max_weight=1),
            key,
            round_=1,
            sampled=[0, 1],
            dim=3,
            encrypt_request=lambda c: he.Settings("bfv", clip_norm=1.0, max_weight=1).request(
                1, c, 2, torch.zeros(3), {}, {}, b""
            ),
        )


def _tamper(victim: int, mutate: Callable[[messages.HeEncrypted], messages.HeEncrypted]):
    def wrap(handler):
        def tampered(cid: int, payload: bytes) -> bytes:
            reply = handler(cid, payload)
            if cid == victim and messages.kind_of(reply) == "HeEncrypted":
                return messages.encode(mutate(messages.decode(reply, messages.HeEncrypted)))
            return reply

        return tampered

    return wrap


_PARSER = encryption.context_from_bytes(
    encryption.server_bytes(encryption.secret_context(encryption.BFV)), secret=False
)


def _flip(reply: messages.HeEncrypted) -> messages.HeEncrypted:
    """One byte of the first ciphertext flipped, at the last position where the result still
    parses under the round's parameters (so that only a signature can reveal it)."""
    blobs = dict(reply.ciphertexts)
    for at in range(len(blobs[0]) - 1, 0, -97):
        raw = bytearray(blobs[0])
        raw[at] ^= 0xFF
        try:
            encryption.load(_PARSER, encryption.BFV, [bytes(raw)], encryption.BFV.slots)
        except encryption.HEError:
            continue
        blobs[0] = bytes(raw)
        return messages.HeEncrypted(reply.round, reply.client_id, blobs, reply.signature)
    raise AssertionError("no flipped byte parses")


def test_a_flipped_ciphertext_fails_its_signature_and_the_rest_stays_exact() -> None:
    ids = secagg.Identities.simulated(3, range(N))
    result, _, _ = _run("bfv", identities=ids, handler_wrap=_tamper(3, _flip))
    alive = [c for c in range(N) if c != 3]
    total, weight = _reference(alive)
    assert result.survivors == alive and result.weight == weight
    assert float(np.abs(result.total - total).max()) < 1e-4
    assert [c for c, why in result.problems if "bad signature" in why] == [3]
    assert result.metrics["clients_rejected"] == 1


def test_without_signatures_the_same_flip_corrupts_the_sum() -> None:
    """The control: the protection above is the signature, not the parser."""
    result, _, _ = _run("bfv", handler_wrap=_tamper(3, _flip))
    total, _ = _reference(list(range(N)))
    assert result.survivors == list(range(N))
    assert float(np.abs(result.total - total).max()) > 1.0


def test_another_clients_ciphertexts_under_a_signature_are_rejected() -> None:
    ids = secagg.Identities.simulated(3, range(N))
    stolen: dict[str, messages.HeEncrypted] = {}

    def wrap(handler):
        def h(cid: int, payload: bytes) -> bytes:
            reply = handler(cid, payload)
            if messages.kind_of(reply) != "HeEncrypted":
                return reply
            decoded = messages.decode(reply, messages.HeEncrypted)
            if cid == 0:
                stolen["c0"] = decoded
            if cid == 4:  # client 4 replays client 0's ciphertexts under its own signature
                c0 = stolen["c0"]
                return messages.encode(
                    messages.HeEncrypted(1, 4, c0.ciphertexts, decoded.signature)
                )
            return reply

        return h

    result, _, _ = _run("bfv", identities=ids, handler_wrap=wrap)
    alive = [c for c in range(N) if c != 4]
    total, weight = _reference(alive)
    assert result.weight == weight and float(np.abs(result.total - total).max()) < 1e-4
    assert [c for c, why in result.problems if "bad signature" in why] == [4]


@pytest.mark.parametrize(
    "mutate, why",
    [
        (
            lambda r: messages.HeEncrypted(1, r.client_id, {0: b"garbage"}, r.signature),
            "ciphertexts, expected",
        ),
        (
            lambda r: messages.HeEncrypted(
                1, r.client_id, {i: b"\x00" * 40 for i in range(len(r.ciphertexts))}, r.signature
            ),
            "malformed ciphertexts",
        ),
        (
            lambda r: messages.HeEncrypted(
                1,
                r.client_id,
                dict(
                    enumerate(
                        encryption.encrypt(
                            encryption.secret_context(
                                encryption.Params("bfv", 4096, (54, 55), plain_modulus=1032193)
                            ),
                            encryption.Params("bfv", 4096, (54, 55), plain_modulus=1032193),
                            np.zeros(DIM + 1, dtype=np.int64),
                        )
                    )
                ),
                r.signature,
            ),
            "malformed ciphertexts",
        ),
    ],
    ids=["wrong count", "unparsable", "other parameters"],
)
def test_malformed_ciphertexts_exclude_their_client(mutate, why: str) -> None:
    result, _, _ = _run("bfv", handler_wrap=_tamper(1, mutate))
    alive = [c for c in range(N) if c != 1]
    total, weight = _reference(alive)
    assert result.weight == weight and float(np.abs(result.total - total).max()) < 1e-4
    problems = [(c, w) for c, w in result.problems]
    assert len(problems) == 1 and problems[0][0] == 1 and why in problems[0][1], problems


def _lying_decryptor(liar: int):
    def wrap(handler):
        def h(cid: int, payload: bytes) -> bytes:
            reply = handler(cid, payload)
            if cid == liar and messages.kind_of(reply) == "HeDecrypted":
                honest = messages.decode(reply, messages.HeDecrypted)
                if honest.digest:  # the second decryptor: the digest of a shifted plaintext
                    forged = bytes([honest.digest[0] ^ 1]) + honest.digest[1:]
                    return messages.encode(messages.HeDecrypted(1, cid, honest.plain, forged))
                plain = honest.plain.clone()
                plain[:10] += 1 << 28  # shifts the decoded sum by about 100
                return messages.encode(messages.HeDecrypted(1, cid, plain))
            return reply

        return h

    return wrap


def test_a_lying_decryptor_is_detected_with_two_decryptors() -> None:
    with pytest.raises(SecAggAbortedError, match="different plaintexts") as info:
        for liar in range(N):  # whichever two are chosen, the liar is among some choice
            _run("bfv", handler_wrap=_lying_decryptor(liar))
    assert info.value.metrics["clients_completed"] == 0


def test_with_one_decryptor_the_lie_goes_through() -> None:
    """The control: one decryptor's lie is not detected (so two are the default)."""
    errors = []
    for liar in range(N):
        result, _, _ = _run("bfv", decryptors=1, handler_wrap=_lying_decryptor(liar))
        total, _ = _reference(list(range(N)))
        errors.append(float(np.abs(result.total - total).max()))
    assert max(errors) > 1e-3  # the chosen decryptor lied at least once, undetected
    assert min(errors) < 1e-4


def test_bfv_headroom_and_ckks_range_are_checked() -> None:
    s = he.Settings("bfv", clip_norm=1.0, max_weight=1, bits=32)
    s.check_cohort(128)  # 32 + 7 + 1 = 40 bits
    with pytest.raises(ValueError, match="set bits to at most 31"):
        s.check_cohort(129)
    with pytest.raises(ValueError, match="Distributed DP needs"):
        from fedguard.algorithms.privacy import distributed_dp

        he.Settings("ckks", 1.0, 1, weighted=False, distributed=distributed_dp.Skellam(1.0, 5))
    c = he.Settings("ckks", clip_norm=1000.0, max_weight=1)
    c.check_cohort(4000 // 2 // 2)
    with pytest.raises(ValueError, match="beyond"):
        he.Settings("ckks", clip_norm=5000.0, max_weight=1).check_cohort(1000)
    assert math.isclose(encryption.CKKS.max_abs, 2.0**22)


def test_parameters_are_128_bit_secure_and_the_plain_modulus_prime() -> None:
    for params in encryption.PARAMS.values():
        assert sum(params.coeff_bits) <= encryption.HE_STANDARD_MAX_LOG_Q[params.poly_degree] == 109
    t = encryption.BFV.plain_modulus
    assert 2**39 < t < 2**40 and t % 8192 == 1
    import sympy

    assert sympy.isprime(t) and encryption.is_prime(t) and not encryption.is_prime(t - 2)
    with pytest.raises(ValueError, match="128-bit"):
        encryption.Params("bfv", 4096, (60, 60), plain_modulus=t)


def test_a_client_refuses_what_its_pins_and_the_protocol_forbid() -> None:
    key = encryption.secret_context(encryption.BFV)
    pins = he.Settings("bfv", clip_norm=CLIP, max_weight=MAX_W, weighted=False)
    client = he_client.HEClient(_fit, key, pins=pins, min_inputs=3)
    ok = pins.request(1, 0, N, torch.zeros(DIM), {"seed": 0}, {}, b"")
    with pytest.raises(he.HEProtocolError, match="clip norm 4, its configuration allows at most 2"):
        client.encrypt(
            he.Settings("bfv", clip_norm=4.0, max_weight=1, weighted=False).request(
                1, 0, N, torch.zeros(DIM), {}, {}, b""
            )
        )
    with pytest.raises(he.HEProtocolError, match="a weighted sum"):
        client.encrypt(
            he.Settings("bfv", clip_norm=CLIP, max_weight=MAX_W).request(
                1, 0, N, torch.zeros(DIM), {}, {}, b""
            )
        )
    blobs = client.encrypt(ok).ciphertexts
    with pytest.raises(he.HEProtocolError, match="has encrypted in round 1"):
        client.encrypt(ok)  # a replayed round
    with pytest.raises(he.HEProtocolError, match="did not encrypt an update in that round"):
        client.decrypt(messages.HeDecryptRequest(2, 0, blobs, [0, 1, 2], "bfv", DIM))
    with pytest.raises(he.HEProtocolError, match="decrypts sums of at least 3"):
        client.decrypt(messages.HeDecryptRequest(1, 0, blobs, [0, 1], "bfv", DIM))
    with pytest.raises(he.HEProtocolError, match="uses bfv"):
        client.decrypt(messages.HeDecryptRequest(1, 0, blobs, [0, 1, 2], "ckks", DIM))
    reply = client.decrypt(messages.HeDecryptRequest(1, 0, blobs, [0, 1, 2], "bfv", DIM))
    plain = reply.plain
    assert int(plain[-1]) == 1  # its own unweighted encoding: weight 1
    # the sum travels as its 32-bit ring residues: 4 bytes a value, not the plaintext's 8
    assert plain.dtype == torch.int32 and plain.shape == (DIM + 1,)
    assert 4 * (DIM + 1) < len(messages.encode(reply)) < 4 * (DIM + 1) + 1024
    # a second decryptor sends the SHA-256 of that plaintext's little-endian bytes, not a vector
    second = he_client.HEClient(_fit, key)
    second.encrypt(ok)
    check = second.decrypt(messages.HeDecryptRequest(1, 0, blobs, [0, 1, 2], "bfv", DIM, True))
    assert check.plain.numel() == 0 and len(messages.encode(check)) < 1024
    assert check.digest == hashlib.sha256(plain.numpy().astype("<i4").tobytes()).digest()
    with pytest.raises(he.HEProtocolError, match="decrypted that round's sum already"):
        client.decrypt(messages.HeDecryptRequest(1, 0, blobs, [0, 1, 2], "bfv", DIM))
    ids = secagg.Identities.simulated(1, [0])
    signed = he_client.HEClient(_fit, key, identities=ids)
    with pytest.raises(he.HEProtocolError, match="only verified rounds"):
        signed.encrypt(ok)
