"""The cryptographic primitives of secure aggregation, on the ``cryptography`` package.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS
2017), section 3, instantiated as in their section 6 and in Bell et al. (CCS 2020):

* key agreement: X25519; the shared secret goes through HKDF-SHA256 with a label, the round and
  the ordered pair of client ids, giving (a) the AES-256-GCM key of the pair's share bundles
  (from the ``c`` keys) and (b) the pair's 32-byte mask seed ``s_uv`` (from the ``s`` keys);
* authenticated encryption: AES-256-GCM with a random 96-bit nonce, the associated data binding
  round, sender and receiver, so a bundle relayed to another pair or round fails to decrypt;
* pseudo-random generator: AES-256-CTR keystream (the encryption of zeros under the seed)
  viewed as unsigned integers, masked to ``b`` bits;
* identities: Ed25519 signatures, by a client's long-term key, over its advertised public keys
  and over the survivor set of the consistency check (Bonawitz et al., section 4: the version
  secure against a malicious server); every signed payload binds a label, the round and the
  round's nonce, so that a signature never verifies in another round or for another purpose;
* commitments: SHA-256 with a label, binding round, nonce and client id, for the randomness of
  the SecAgg+ graph (commit, then reveal) and for the shares a client hands out.

Pure functions; randomness is passed in as ``random_bytes(n)`` (``os.urandom`` in production).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RandomBytes = Callable[[int], bytes]
KEY_BYTES = 32
NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw
_SHARE_KEY_LABEL = b"fedguard/secagg/share-encryption/v1"
_MASK_SEED_LABEL = b"fedguard/secagg/pairwise-mask/v1"
_BUNDLE_LABEL = b"fedguard/secagg/share-bundle/v1"
_KEYS_LABEL = b"fedguard/secagg/advertised-keys/v2"
_SURVIVORS_LABEL = b"fedguard/secagg/consistency-check/v1"
_COMMIT_LABEL = b"fedguard/secagg/graph-commitment/v1"
_GRAPH_LABEL = b"fedguard/secagg/graph-seed/v1"
_SHARE_HASH_LABEL = b"fedguard/secagg/share-commitment/v1"
_TRANSCRIPT_LABEL = b"fedguard/secagg/round-transcript/v1"
_SIMULATED_LABEL = b"fedguard/secagg/simulated-identity/v1"
ROUND_NONCE_BYTES = 32
REVEAL_BYTES = 32
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64


class CryptoError(ValueError):
    """A ciphertext, signature or key that fails verification."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair with its raw 32-byte public key."""

    private: x25519.X25519PrivateKey
    public: bytes


def key_pair(random_bytes: RandomBytes) -> KeyPair:
    """A fresh X25519 key pair from 32 random bytes."""
    private = x25519.X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
    return KeyPair(private, private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def private_bytes(pair: KeyPair) -> bytes:
    """The raw private key (what is secret-shared so the server can recover a dropped client)."""
    return pair.private.private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def key_pair_from_private(raw: bytes) -> KeyPair:
    """The key pair of a reconstructed raw private key."""
    return key_pair(lambda _: raw)


def _agree(
    private: x25519.X25519PrivateKey, peer_public: bytes, label: bytes, info: bytes
) -> bytes:
    try:
        peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as exc:  # wrong length or a low-order point
        raise CryptoError(f"Key agreement with an invalid public key failed: {exc}") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label + info).derive(shared)


# Any scalar does: X25519 clamps it to a multiple of the cofactor 8, so every point of small
# order (the all-zero key among them) maps to the identity, whose all-zero secret is refused.
_PROBE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_BYTES + 1)))


def check_public_key(public: bytes) -> None:
    """Raise :class:`CryptoError` unless ``public`` is a 32-byte X25519 key that agreement
    accepts (not a low-order point such as all zeros, which would give a known secret)."""
    if len(public) != KEY_BYTES:
        raise CryptoError(f"An X25519 public key has {KEY_BYTES} bytes, got {len(public)}.")
    try:
        _PROBE.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise CryptoError("The public key is a low-order point; no secret can be agreed.") from None


def _pair_info(round_: int, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return struct.pack("<qqq", round_, low, high)


def share_key(
    private: x25519.X25519PrivateKey, peer_public: bytes, round_: int, me: int, peer: int
) -> bytes:
    """The AES-256-GCM key that clients ``me`` and ``peer`` share in ``round_``."""
    return _agree(private, peer_public, _SHARE_KEY_LABEL, _pair_info(round_, me, peer))


def mask_seed(
    private: x25519.X25519PrivateKey, peer_public: bytes, round_: int, me: int, peer: int
) -> bytes:
    """The pairwise mask seed ``s_uv`` of clients ``me`` and ``peer`` in ``round_``."""
    return _agree(private, peer_public, _MASK_SEED_LABEL, _pair_info(round_, me, peer))


def _bundle_ad(round_: int, sender: int, receiver: int) -> bytes:
    return _BUNDLE_LABEL + struct.pack("<qqq", round_, sender, receiver)


def encrypt_bundle(
    key: bytes,
    plaintext: bytes,
    *,
    round_: int,
    sender: int,
    receiver: int,
    random_bytes: RandomBytes,
) -> bytes:
    """``nonce || AES-GCM(key, plaintext, ad = (round, sender, receiver))``."""
    nonce = random_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _bundle_ad(round_, sender, receiver))


def decrypt_bundle(
    key: bytes, ciphertext: bytes, *, round_: int, sender: int, receiver: int
) -> bytes:
    """The plaintext of :func:`encrypt_bundle`; raises :class:`CryptoError` if anything differs."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise CryptoError(f"The share bundle from client {sender} is too short to be a ciphertext.")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _bundle_ad(round_, sender, receiver))
    except InvalidTag:
        raise CryptoError(
            f"The share bundle from client {sender} to client {receiver} in round {round_} "
            "failed authentication (tampered, or relayed from another pair or round)."
        ) from None


def _session(label: bytes, round_: int, nonce: bytes) -> bytes:
    """The prefix of every signed or hashed payload: purpose, round and the round's nonce."""
    if len(nonce) != ROUND_NONCE_BYTES:
        raise CryptoError(f"A round nonce has {ROUND_NONCE_BYTES} bytes, got {len(nonce)}.")
    return label + struct.pack("<q", round_) + nonce


def keys_message(
    round_: int,
    nonce: bytes,
    client_id: int,
    c_public: bytes,
    s_public: bytes,
    commitment: bytes = b"",
) -> bytes:
    """The bytes a client signs when it advertises its two public keys (and, in SecAgg+, its
    commitment to its share of the graph's randomness), bound to the round and its nonce."""
    return (
        _session(_KEYS_LABEL, round_, nonce)
        + struct.pack("<qq", client_id, len(commitment))
        + c_public
        + s_public
        + commitment
    )


def survivors_message(
    round_: int, nonce: bytes, transcript: bytes, survivors: Sequence[int]
) -> bytes:
    """The bytes a survivor signs in the consistency check: the round, its nonce, the round's
    public transcript (cohort, graph, threshold: :func:`transcript`) and the sorted survivor set
    ``U3`` it was told about."""
    ids = sorted(survivors)
    return (
        _session(_SURVIVORS_LABEL, round_, nonce)
        + transcript
        + struct.pack(f"<q{len(ids)}q", len(ids), *ids)
    )


def transcript(
    round_: int, nonce: bytes, sampled: Sequence[int], neighbours: int, threshold: int, seed: int
) -> bytes:
    """A digest of a round's public parameters as one client sees them, so that a signature over
    the survivor set is also a signature over the cohort, graph and threshold it was made in."""
    ids = sorted(sampled)
    body = struct.pack(f"<q{len(ids)}qqq", len(ids), *ids, neighbours, threshold)
    return hashlib.sha256(
        _session(_TRANSCRIPT_LABEL, round_, nonce) + body + seed.to_bytes(32, "little")
    ).digest()


def commitment(round_: int, nonce: bytes, client_id: int, reveal: bytes) -> bytes:
    """``H(round, nonce, id, r)``: a client's binding, hiding commitment to its ``r``."""
    if len(reveal) != REVEAL_BYTES:
        raise CryptoError(f"A graph reveal has {REVEAL_BYTES} bytes, got {len(reveal)}.")
    return hashlib.sha256(
        _session(_COMMIT_LABEL, round_, nonce) + struct.pack("<q", client_id) + reveal
    ).digest()


def graph_seed(round_: int, nonce: bytes, reveals: Mapping[int, bytes]) -> int:
    """The SecAgg+ graph seed: ``H(round, nonce, sorted (id, r_id))`` as a 256-bit integer.

    Any one honest contribution makes it uniform for whoever did not know that ``r`` when its
    commitment was fixed; see :mod:`fedguard.protocol.secagg` for what the server can still do.
    """
    digest = hashlib.sha256(_session(_GRAPH_LABEL, round_, nonce))
    for cid in sorted(reveals):
        digest.update(struct.pack("<q", cid) + reveals[cid])
    return int.from_bytes(digest.digest(), "little")


def share_commitment(
    round_: int, nonce: bytes, owner: int, holder: int, kind: bytes, share: bytes
) -> bytes:
    """``H(round, nonce, owner, holder, kind, share)``: what the owner tells the server of the
    ``kind`` (``b"b"`` or ``b"s"``) share it gave ``holder``, so that a holder who reveals a
    forged share is caught. A share of a uniformly random 32-byte secret has hundreds of bits
    of entropy even given ``t - 1`` other shares (it is fixed only by the secret), so the
    digest hides it."""
    if kind not in (b"b", b"s"):
        raise ValueError(f"A share is of kind b or s, got {kind!r}.")
    return hashlib.sha256(
        _session(_SHARE_HASH_LABEL, round_, nonce)
        + struct.pack("<qq", owner, holder)
        + kind
        + share
    ).digest()


def simulated_identity(seed: int, client_id: int) -> ed25519.Ed25519PrivateKey:
    """A deterministic Ed25519 identity for a simulated client, from the run's seed.

    Only for simulation: anyone who knows the seed knows every key. A deployed client holds a
    long-term key of its own (``fedguard tokens`` writes one per client)."""
    raw = hashlib.sha256(_SIMULATED_LABEL + struct.pack("<qq", seed, client_id)).digest()
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def public_identity(identity: ed25519.Ed25519PrivateKey) -> ed25519.Ed25519PublicKey:
    """The public half of a long-term identity."""
    return identity.public_key()


def sign(identity: ed25519.Ed25519PrivateKey, message: bytes) -> bytes:
    """An Ed25519 signature."""
    return identity.sign(message)


def verify(
    identity: ed25519.Ed25519PublicKey,
    signature: bytes,
    message: bytes,
    *,
    client_id: int,
    what: str = "advertised keys",
) -> None:
    """Raise :class:`CryptoError` unless ``signature`` is ``client_id``'s over ``message``."""
    try:
        identity.verify(signature, message)
    except InvalidSignature:
        raise CryptoError(f"The {what} of client {client_id} carry an invalid signature.") from None


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds ``Z_{2^bits}`` (uint32 up to 32 bits, else uint64)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"The ring must have 1 to 64 bits, got {bits}.")
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def ring_mask(bits: int) -> np.unsignedinteger:
    """``2^bits - 1`` in the ring's dtype."""
    return ring_dtype(bits).type((1 << bits) - 1)


_CHUNK_BYTES = 1 << 18  # keystream per AES-CTR call (256 KB: the fastest of 32 KB to 1 MB here)
_ZEROS = bytes(_CHUNK_BYTES)  # the plaintext whose CTR encryption is the keystream


class _Scratch(threading.local):
    """A per-thread output buffer for keystream chunks, so that concurrent handlers in a deployed
    server never share one, and no expansion allocates (fresh buffers for every 400 KB mask, and
    their page faults, cost as much as the AES work)."""

    def __init__(self) -> None:
        self.stream = bytearray(_CHUNK_BYTES + 15)  # update_into wants a block's slack


_SCRATCH = _Scratch()


def _accumulate(out: np.ndarray, seed: bytes, subtract: bool) -> None:
    """``out (+/-)= PRG(seed)`` over ``out``'s words, chunk by chunk from one CTR stream."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"A mask seed has {KEY_BYTES} bytes, got {len(seed)}.")
    if out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("Masks are added to contiguous vectors.")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream, zeros = _SCRATCH.stream, memoryview(_ZEROS)
    per_chunk = _CHUNK_BYTES // out.dtype.itemsize
    op = np.subtract if subtract else np.add
    for start in range(0, out.shape[0], per_chunk):
        part = out[start : start + per_chunk]
        encryptor.update_into(zeros[: part.nbytes], stream)
        op(part, np.frombuffer(stream, dtype=out.dtype, count=part.shape[0]), out=part)


def expand_mask(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """``PRG(seed)``: ``dim`` uniform elements of ``Z_{2^bits}`` (AES-256-CTR keystream).

    The keystream is the CTR encryption of zeros under ``seed`` with a zero nonce (each seed is
    used for exactly one expansion), read as little-endian words and masked to ``bits``.
    """
    out = np.zeros(dim, dtype=ring_dtype(bits))
    _accumulate(out, seed, subtract=False)
    out &= ring_mask(bits)
    return out


def add_mask(out: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """``out += PRG(seed)`` (or ``-=``) in place, modulo the width of ``out``'s dtype
    (``uint32`` or ``uint64``), without materialising the mask.

    The mask is not reduced to ``bits``: ``2^bits`` divides ``2^32`` (``2^64``), so reducing the
    final sum once gives the same residues as reducing every term.
    """
    if out.dtype not in (np.dtype("<u4"), np.dtype("<u8")):
        raise ValueError(f"Masks are added in uint32 or uint64 rings, got {out.dtype}.")
    _accumulate(out, seed, subtract)


def add_pairwise_masks(
    out: np.ndarray,
    *,
    owner: int,
    private: x25519.X25519PrivateKey,
    peer_publics: dict[int, bytes],
    round_: int,
) -> None:
    """Add ``owner``'s pairwise masks to ``out`` in place: ``+PRG(s_uv)`` for each peer ``v >
    owner``, ``-PRG(s_uv)`` for ``v < owner`` (Bonawitz et al. 2017), so that two peers' masks
    cancel in the sum. Like :func:`add_mask`, modulo the width of ``out``'s dtype.

    The same call serves both halves: a client masks its input with its own key, and the server,
    having reconstructed a dropped client's key, adds the masks that client would have added,
    which takes back out the halves its surviving peers added.
    """
    for v in sorted(peer_publics):
        add_mask(out, mask_seed(private, peer_publics[v], round_, owner, v), subtract=v < owner)
