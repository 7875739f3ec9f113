"""Homomorphic encryption of update vectors with TenSEAL (Microsoft SEAL): parameters, keys,
encryption, homomorphic addition, decryption and the compact wire form.

The server adds ciphertexts without the secret key; only a holder of the key (a client) can
decrypt the sum. Every ring operation (NTT, sampling, encoding, addition) is SEAL's; this module
only chooses parameters, packs vectors into ciphertexts and checks what it is given.

**Schemes.** ``"bfv"`` encrypts integers modulo a prime plain modulus ``t``: a sum of encrypted
integers decrypts exactly while it stays inside ``(-t/2, t/2)``, so clients encrypt their
fixed-point encodings (the same quantisation as masking, :mod:`fedguard.algorithms.secagg.quantize`)
and the sum is exact up to that quantisation, which also lets distributed DP's integer noise add
up exactly. ``"ckks"`` encrypts real numbers approximately (Cheon, Kim, Kim and Song 2017): the
decrypted sum carries a small error (measured in the benchmark), and it packs half as many
values per ciphertext, so its messages are twice as large.

**Parameters** (:data:`BFV`, :data:`CKKS`) follow the Homomorphic Encryption Standard's table
for 128-bit classical security with ternary secrets (Albrecht et al., 2018): a ring of degree
``N = 4096`` allows a ciphertext modulus of at most 109 bits, and ``[54, 55]`` uses exactly 109
(SEAL keeps the last prime for key switching, so a ciphertext lives modulo the 54-bit prime).
BFV's plain modulus is the 40-bit prime ``1099511480321`` (``= 1 mod 2N``, which SIMD batching
needs): measured here, sums of 2,000 fresh ciphertexts of values up to ``t / 4000`` decrypt
exactly at 40 bits and not at 44 (the noise of the sum outgrows ``q / 2t``), so at most
:attr:`Params.max_summed` ciphertexts are added. CKKS encodes at scale ``2^30``: a sum must stay
below ``2^22`` in magnitude (the 54-bit modulus leaves 23 bits above the scale, one for the sign).

**Encryption** is symmetric (with the secret key): every party that encrypts holds the key
anyway. TenSEAL serialises both halves of a ciphertext (SEAL's seeded form of a symmetric
ciphertext is not used), so it is as large as a public-key one: 61.7 kB for 4,096 BFV values
either way, measured. The ratio to the float32 update comes from the parameters: two
polynomials of ``N`` coefficients modulo one 54-bit prime, compressed, per ``N`` values (BFV).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

BFV_SCHEME = "bfv"
CKKS_SCHEME = "ckks"
SCHEMES = (BFV_SCHEME, CKKS_SCHEME)
# The Homomorphic Encryption Standard's largest ciphertext modulus (bits) at 128-bit security
# (classical, ternary secret) per ring degree.
HE_STANDARD_MAX_LOG_Q = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
_CIPHERTEXTS_LABEL = b"fedguard/he/ciphertexts/v1"


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for ``n < 3.3e24`` (the first 13 prime bases)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


class HEError(ValueError):
    """Bytes that are not a ciphertext under the expected parameters, or a vector that does
    not fit them."""


@dataclass(frozen=True)
class Params:
    """One scheme's parameters: ring degree ``poly_degree``, the bit sizes of the ciphertext
    modulus' primes, BFV's prime ``plain_modulus`` or CKKS's ``scale_bits``, and the most
    ciphertexts a sum may add (``max_summed``) before its noise could garble it."""

    scheme: str
    poly_degree: int
    coeff_bits: tuple[int, ...]
    plain_modulus: int = 0
    scale_bits: int = 0
    max_summed: int = 2000

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown scheme {self.scheme!r}; expected one of {SCHEMES}.")
        most = HE_STANDARD_MAX_LOG_Q.get(self.poly_degree)
        if most is None or sum(self.coeff_bits) > most:
            raise ValueError(
                f"Ring degree {self.poly_degree} with a {sum(self.coeff_bits)}-bit modulus is "
                "not 128-bit secure by the Homomorphic Encryption Standard."
            )
        if self.scheme == BFV_SCHEME and (
            self.plain_modulus % (2 * self.poly_degree) != 1 or not is_prime(self.plain_modulus)
        ):
            raise ValueError(
                f"The BFV plain modulus must be a prime = 1 mod {2 * self.poly_degree}."
            )

    @property
    def slots(self) -> int:
        """Values packed in one ciphertext (``N`` for BFV, ``N / 2`` for CKKS)."""
        return self.poly_degree if self.scheme == BFV_SCHEME else self.poly_degree // 2

    @property
    def max_abs(self) -> float:
        """The largest magnitude a decrypted sum's entry may have and still be right: below
        ``t / 2`` (BFV), below ``2^(54 - scale - 1)`` (CKKS, see the module docstring)."""
        if self.scheme == BFV_SCHEME:
            return float((self.plain_modulus - 1) // 2)
        return float(2 ** (self.coeff_bits[0] - self.scale_bits - 2))

    def ciphertexts(self, length: int) -> int:
        """How many ciphertexts hold a vector of ``length`` values."""
        return math.ceil(length / self.slots)

    def describe(self) -> str:
        """A one-line description (what a mismatch error quotes)."""
        extra = (
            f"t={self.plain_modulus}" if self.scheme == BFV_SCHEME else f"scale=2^{self.scale_bits}"
        )
        return f"{self.scheme} N={self.poly_degree} q={list(self.coeff_bits)} {extra}"


BFV = Params(BFV_SCHEME, 4096, (54, 55), plain_modulus=1099511480321)
CKKS = Params(CKKS_SCHEME, 4096, (54, 55), scale_bits=30)
PARAMS = {BFV_SCHEME: BFV, CKKS_SCHEME: CKKS}
PLAIN_BITS = 40  # BFV's plain modulus lies in [2^39, 2^40)


def secret_context(params: Params) -> Any:
    """A fresh context with a new secret key (what the clients hold, never the server)."""
    if params.scheme == BFV_SCHEME:
        ctx = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=params.poly_degree,
            plain_modulus=params.plain_modulus,
            coeff_mod_bit_sizes=list(params.coeff_bits),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
    else:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_degree,
            coeff_mod_bit_sizes=list(params.coeff_bits),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
        ctx.global_scale = float(2**params.scale_bits)
    return ctx


def key_bytes(ctx: Any) -> bytes:
    """The context with its secret key, serialised (a client's key file)."""
    return bytes(ctx.serialize(save_secret_key=True))


def server_bytes(ctx: Any) -> bytes:
    """The context without any key, serialised: the parameters a server needs to load and add
    ciphertexts, and nothing that decrypts them."""
    return bytes(
        ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def context_from_bytes(data: bytes, *, secret: bool) -> Any:
    """A context from :func:`key_bytes` (``secret``) or :func:`server_bytes`; raises
    :class:`HEError` for bytes that are not one, or that hold (or lack) the secret key."""
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises ValueError or RuntimeError for bad streams
        raise HEError(f"Not a serialised TenSEAL context: {exc}") from None
    if bool(ctx.has_secret_key()) != secret:
        what = "lacks the secret key" if secret else "holds a secret key"
        raise HEError(f"The context {what}.")
    return ctx


def can_decrypt(ctx: Any) -> bool:
    """Whether ``ctx`` holds the secret key."""
    return bool(ctx.has_secret_key())


def encrypt(ctx: Any, params: Params, values: np.ndarray) -> list[bytes]:
    """``values`` (int64 below ``t / 2`` in magnitude for BFV, floats for CKKS) encrypted in
    ``params.ciphertexts(len(values))`` ciphertexts of ``params.slots`` values each (the last
    one shorter), each serialised in SEAL's compressed form."""
    x = np.asarray(values)
    if x.ndim != 1:
        raise HEError(f"Only vectors are encrypted, got shape {x.shape}.")
    out: list[bytes] = []
    step = params.slots
    if params.scheme == BFV_SCHEME:
        ints = x.astype(np.int64)
        if ints.size and int(np.abs(ints).max()) > params.max_abs:
            raise HEError("A value is outside the plain modulus' signed range.")
        for start in range(0, len(ints), step):
            out.append(bytes(ts.bfv_vector(ctx, ints[start : start + step].tolist()).serialize()))
    else:
        floats = x.astype(np.float64)
        for start in range(0, len(floats), step):
            chunk = floats[start : start + step].tolist()
            out.append(bytes(ts.ckks_vector(ctx, chunk).serialize()))
    return out


def chunk_lengths(params: Params, length: int) -> list[int]:
    """The number of values in each ciphertext of a ``length``-vector."""
    full, rest = divmod(length, params.slots)
    return [params.slots] * full + ([rest] if rest else [])


def load(ctx: Any, params: Params, blobs: Sequence[bytes], length: int) -> list[Any]:
    """Deserialise the ciphertexts of a ``length``-vector; raises :class:`HEError` if there are
    not as many as it needs, one does not parse under ``ctx``'s parameters, or one holds another
    number of values than its place in the vector."""
    sizes = chunk_lengths(params, length)
    if len(blobs) != len(sizes):
        raise HEError(f"{len(blobs)} ciphertexts, expected {len(sizes)}.")
    loader = ts.bfv_vector_from if params.scheme == BFV_SCHEME else ts.ckks_vector_from
    vectors = []
    for i, (blob, size) in enumerate(zip(blobs, sizes, strict=True)):
        try:
            vector = loader(ctx, blob)
            got = int(vector.size())
        except Exception as exc:  # SEAL/TenSEAL raise ValueError or RuntimeError
            raise HEError(
                f"ciphertext {i} does not load under the round's parameters: {exc}"
            ) from None
        if got != size:
            raise HEError(f"ciphertext {i} holds {got} values, expected {size}.")
        vectors.append(vector)
    return vectors


def add(total: list[Any] | None, vectors: list[Any]) -> list[Any]:
    """``total + vectors`` elementwise, homomorphically (``vectors`` when ``total`` is None);
    ``total``'s ciphertexts are updated in place."""
    if total is None:
        return list(vectors)
    if len(total) != len(vectors):
        raise HEError(f"Cannot add {len(vectors)} ciphertexts to {len(total)}.")
    for acc, v in zip(total, vectors, strict=True):
        acc.add_(v)
    return total


def serialize(vectors: Sequence[Any]) -> list[bytes]:
    """The compact wire form of ``vectors``."""
    return [bytes(v.serialize()) for v in vectors]


def decrypt(ctx: Any, params: Params, blobs: Sequence[bytes], length: int) -> np.ndarray:
    """The plaintext of serialised ciphertexts of a ``length``-vector (int64 for BFV, read as
    signed residues in ``(-t/2, t/2]``; float64 for CKKS); raises :class:`HEError` for bad
    ciphertexts and ``ValueError`` (TenSEAL's) when ``ctx`` has no secret key."""
    if not can_decrypt(ctx):
        raise ValueError("The context holds no secret key: it cannot decrypt.")
    vectors = load(ctx, params, blobs, length)
    dtype = np.int64 if params.scheme == BFV_SCHEME else np.float64
    parts = [np.asarray(v.decrypt(), dtype=dtype) for v in vectors]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def ciphertexts_message(round_: int, nonce: bytes, client_id: int, blobs: Sequence[bytes]) -> bytes:
    """The bytes a client signs over its encrypted update: bound to the round, its nonce, the
    client and the SHA-256 digest of every ciphertext in order (a substituted, reordered or
    flipped ciphertext changes it)."""
    h = hashlib.sha256()
    for blob in blobs:
        h.update(struct.pack("<q", len(blob)))
        h.update(hashlib.sha256(blob).digest())
    return (
        _CIPHERTEXTS_LABEL
        + struct.pack("<qqq", round_, len(nonce), client_id)
        + nonce
        + struct.pack("<q", len(blobs))
        + h.digest()
    )
