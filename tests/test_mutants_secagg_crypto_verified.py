"""The payloads of verified secure aggregation, byte for byte (found by mutation testing): what a
client signs and what it hashes, against references built here from the documented layout
(label, round, nonce, then little-endian 64-bit fields), so that a changed field, order, width,
byte order or check changes a digest or a signed message."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.algorithms.secagg import crypto

NONCE = bytes(range(40, 40 + 32))
ROUND = 7


def _session(label: bytes, round_: int = ROUND, nonce: bytes = NONCE) -> bytes:
    return label + round_.to_bytes(8, "little", signed=True) + nonce


def _i64(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


def test_the_session_prefix_needs_a_nonce_of_32_bytes() -> None:
    for bad in (NONCE[:31], NONCE + b"\x00", b""):
        with pytest.raises(crypto.CryptoError, match="round nonce has 32 bytes"):
            crypto.keys_message(ROUND, bad, 3, b"c" * 32, b"s" * 32)
    # a negative round is packed signed, as the reference does
    got = crypto.keys_message(-2, NONCE, 3, b"c" * 32, b"s" * 32)
    assert got.startswith(_session(b"fedguard/secagg/advertised-keys/v2", -2))


def test_keys_message_layout_with_and_without_a_commitment() -> None:
    c_public, s_public = bytes(range(32)), bytes(range(100, 132))
    label = b"fedguard/secagg/advertised-keys/v2"
    plain = crypto.keys_message(ROUND, NONCE, 5, c_public, s_public)
    assert plain == _session(label) + _i64(5, 0) + c_public + s_public
    committed = crypto.keys_message(ROUND, NONCE, 5, c_public, s_public, commitment=b"\x09" * 32)
    assert committed == _session(label) + _i64(5, 32) + c_public + s_public + b"\x09" * 32


def test_survivors_message_signs_the_sorted_survivor_set() -> None:
    digest = bytes(range(200, 232))
    got = crypto.survivors_message(ROUND, NONCE, digest, [9, 2, 5])
    label = b"fedguard/secagg/consistency-check/v1"
    assert got == _session(label) + digest + _i64(3, 2, 5, 9)
    assert crypto.survivors_message(ROUND, NONCE, digest, (5, 9, 2)) == got
    assert crypto.survivors_message(ROUND, NONCE, digest, []) == _session(label) + digest + _i64(0)


def test_transcript_is_the_digest_of_the_sorted_cohort_graph_and_seed() -> None:
    seed = 2**200 + 3 * 2**70 + 11  # a 256-bit graph seed, little-endian in 32 bytes
    body = _i64(4, 1, 3, 6, 8, 2, 3) + seed.to_bytes(32, "little")
    reference = hashlib.sha256(_session(b"fedguard/secagg/round-transcript/v1") + body).digest()
    assert crypto.transcript(ROUND, NONCE, [8, 3, 1, 6], 2, 3, seed) == reference
    assert crypto.transcript(ROUND, NONCE, [8, 3, 1, 6], 3, 2, seed) != reference
    assert crypto.transcript(ROUND + 1, NONCE, [8, 3, 1, 6], 2, 3, seed) != reference


def test_commitment_digest_and_reveal_length() -> None:
    reveal = bytes(range(3, 35))
    reference = hashlib.sha256(
        _session(b"fedguard/secagg/graph-commitment/v1") + _i64(12) + reveal
    ).digest()
    assert crypto.commitment(ROUND, NONCE, 12, reveal) == reference
    for bad in (reveal[:31], reveal + b"\x00"):
        with pytest.raises(crypto.CryptoError, match="graph reveal has 32 bytes"):
            crypto.commitment(ROUND, NONCE, 12, bad)


def test_graph_seed_hashes_the_reveals_in_id_order_as_a_little_endian_integer() -> None:
    reveals = {9: b"\x01" * 32, 2: b"\x02" * 32, 5: bytes(range(32))}
    digest = hashlib.sha256(_session(b"fedguard/secagg/graph-seed/v1"))
    for cid in (2, 5, 9):
        digest.update(_i64(cid) + reveals[cid])
    reference = int.from_bytes(digest.digest(), "little")
    assert crypto.graph_seed(ROUND, NONCE, reveals) == reference
    assert crypto.graph_seed(ROUND, NONCE, dict(sorted(reveals.items()))) == reference
    assert reference != int.from_bytes(digest.digest(), "big")


def test_share_commitment_digest_and_kinds() -> None:
    share = bytes(range(50, 90))
    label = b"fedguard/secagg/share-commitment/v1"
    for kind in (b"b", b"s"):
        reference = hashlib.sha256(_session(label) + _i64(4, 11) + kind + share).digest()
        assert crypto.share_commitment(ROUND, NONCE, 4, 11, kind, share) == reference
    for bad in (b"x", b"bs", b""):
        with pytest.raises(ValueError, match="kind b or s"):
            crypto.share_commitment(ROUND, NONCE, 4, 11, bad, share)


def test_simulated_identity_is_the_hash_of_seed_and_id() -> None:
    raw = hashlib.sha256(b"fedguard/secagg/simulated-identity/v1" + _i64(2026, 13)).digest()
    identity = crypto.simulated_identity(2026, 13)
    got = identity.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    assert got == raw
    reference = ed25519.Ed25519PrivateKey.from_private_bytes(raw).public_key()
    raw_public = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert crypto.public_identity(identity).public_bytes(*raw_public) == reference.public_bytes(
        *raw_public
    )


def test_an_invalid_signature_names_what_was_signed() -> None:
    identity = crypto.simulated_identity(5, 1)
    message = crypto.survivors_message(ROUND, NONCE, bytes(32), [1, 2])
    signature = crypto.sign(identity, message)
    crypto.verify(identity.public_key(), signature, message, client_id=1, what="survivor set")
    forged = crypto.survivors_message(ROUND, NONCE, bytes(32), [1, 3])
    with pytest.raises(crypto.CryptoError, match="^The survivor set of client 1 carry an inv"):
        crypto.verify(identity.public_key(), signature, forged, client_id=1, what="survivor set")
    with pytest.raises(crypto.CryptoError, match="^The advertised keys of client 1 carry an inv"):
        crypto.verify(identity.public_key(), signature, forged, client_id=1)
