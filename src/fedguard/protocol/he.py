"""Aggregation under homomorphic encryption: what the server and client halves share.

``[secure_aggregation] mode = "ckks"`` (the name the issue gives the mode; ``he_scheme`` picks
BFV or CKKS under it). Every client of the federation holds one secret key, made once per run
(in simulation at assembly, handed to the client side only; in a deployment by ``fedguard
he-keys``, which writes the clients' key file and the server's key-less parameter file). A round
is two exchanges over any transport:

1. encrypt: every sampled client trains, clips its update to ``clip_norm``, encodes it with its
   weight (BFV: the fixed-point encoding of masking, :mod:`fedguard.algorithms.secagg.quantize`,
   read as signed integers; CKKS: ``[w x / W, w / W]`` in floats), encrypts it and, where it has
   an identity, signs the digest of its ciphertexts bound to the round's nonce. The server checks
   each reply (it parses, has the right number of ciphertexts of the round's parameters, and its
   signature verifies against the registered identity) and adds the good ones homomorphically;
   a bad reply is excluded and its client named in the round's problems.
2. decrypt: the server sends the summed ciphertexts to ``decryptors`` clients that contributed
   (chosen at random; one that fails is replaced by another contributor) and takes the
   plaintext sum from the first; a second decryptor sends only the SHA-256 digest of its
   plaintext (32 bytes instead of a vector). The digest must match the first's plaintext
   (decryption is deterministic), so one lying decryptor is detected and the round aborted
   instead of corrupting the model.

**Threat model (weaker than masking's).** The server never holds the key, so alone and
semi-honest it learns only the sum. But every client holds the same key: any one client that
colludes with the server (or reads another client's ciphertext) decrypts every update, and a
malicious server can ask a decryptor to decrypt one client's ciphertext instead of the sum (a
decryptor cannot tell a sum from a single ciphertext). Threshold keys, in which no single party
can decrypt, need multiparty key generation and partial decryption, which no library usable here
provides (see the README).

**Exactness.** BFV sums integers exactly while every entry stays below ``t / 2``: with ring bits
``b`` each client's entries are below ``2^(b-1)``, so ``n`` clients need
``b + ceil(log2 n) + 1 <= 40`` (the plain modulus' bits); reduced modulo ``2^b`` the decrypted
sum is exactly the ring sum masking would unmask, and it is decoded by the same code. Distributed
DP (each client's Skellam share added before encryption) therefore composes exactly as with
masking; with CKKS, whose sums are approximate, it is refused.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedguard.algorithms.he import encryption
from fedguard.algorithms.privacy import distributed_dp
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.protocol import messages

BFV = encryption.BFV_SCHEME
CKKS = encryption.CKKS_SCHEME


class HEProtocolError(RuntimeError):
    """A client refuses an HE request that breaks the protocol or its pins (it sends nothing)."""


@dataclass(frozen=True)
class Settings:
    """Aggregation under homomorphic encryption as configured for a run.

    ``scheme``: ``"bfv"`` (exact integer sums) or ``"ckks"`` (approximate real sums);
    ``clip_norm``, ``max_weight``, ``bits``, ``weighted`` and ``distributed`` mean what they mean
    for masking (:class:`fedguard.protocol.secagg.Settings`); ``decryptors``: how many clients
    decrypt the sum (2: their answers are compared, so one lying decryptor is detected).
    """

    scheme: str
    clip_norm: float
    max_weight: int
    bits: int = 32
    weighted: bool = True
    decryptors: int = 2
    distributed: distributed_dp.Skellam | None = None

    def __post_init__(self) -> None:
        if self.scheme not in encryption.SCHEMES:
            raise ValueError(f"Unknown HE scheme {self.scheme!r}; use one of {encryption.SCHEMES}.")
        if self.decryptors not in (1, 2):
            raise ValueError(f"decryptors must be 1 or 2, got {self.decryptors}.")
        if self.distributed is not None and self.scheme != BFV:
            raise ValueError(
                "Distributed DP needs the sum of the noise shares to be exact: use the BFV "
                "scheme (CKKS sums are approximate)."
            )
        if self.distributed is not None and self.weighted:
            raise ValueError("Distributed DP sums unweighted updates; set weighted = False.")

    @property
    def params(self) -> encryption.Params:
        return encryption.PARAMS[self.scheme]

    def check_cohort(self, num_clients: int) -> None:
        """Raise ValueError unless the sum of ``num_clients`` encrypted updates decrypts right."""
        if num_clients < 2:
            raise ValueError(f"HE aggregation needs at least 2 clients, got {num_clients}.")
        params = self.params
        if num_clients > params.max_summed:
            raise ValueError(
                f"{num_clients} clients: at most {params.max_summed} ciphertexts are summed "
                "before their noise could garble the sum."
            )
        if self.scheme == BFV:
            need = self.bits + math.ceil(math.log2(num_clients)) + 1
            if need > encryption.PLAIN_BITS:
                raise ValueError(
                    f"{self.bits} bits for {num_clients} clients need a {need}-bit plain "
                    f"modulus, the BFV parameters have {encryption.PLAIN_BITS}; set bits to at "
                    f"most {encryption.PLAIN_BITS - 1 - math.ceil(math.log2(num_clients))}."
                )
            self.fixed_point(num_clients)
        elif num_clients * self.clip_norm >= params.max_abs:
            raise ValueError(
                f"A CKKS sum of {num_clients} updates clipped to {self.clip_norm:g} may reach "
                f"{num_clients * self.clip_norm:g}, beyond the {params.max_abs:g} the scale "
                "leaves; lower the clip or the cohort."
            )

    def fixed_point(self, num_clients: int) -> secagg_quantize.FixedPoint:
        """BFV's encoding for ``num_clients`` (as masking's); raises ValueError if too small."""
        weight_cap = self.max_weight if self.weighted else 1
        return encoding(self.bits, self.clip_norm, num_clients, weight_cap, self.distributed)

    def request(
        self,
        round_: int,
        client_id: int,
        cohort: int,
        parameters: torch.Tensor,
        config: dict[str, messages.Scalar],
        tensors: dict[str, torch.Tensor],
        nonce: bytes,
    ) -> messages.HeEncryptRequest:
        """The encrypt request of ``client_id`` in a round of ``cohort`` sampled clients."""
        return messages.HeEncryptRequest(
            round=round_,
            client_id=client_id,
            parameters=parameters,
            scheme=self.scheme,
            bits=self.bits,
            clip_norm=self.clip_norm,
            max_weight=self.max_weight if self.weighted else 1,
            weighted=self.weighted,
            cohort=cohort,
            nonce=nonce,
            config=config,
            tensors=tensors,
        )


def encoding(
    bits: int,
    clip_norm: float,
    num_clients: int,
    max_weight: int,
    mechanism: distributed_dp.Skellam | None,
) -> secagg_quantize.FixedPoint:
    """The fixed-point encoding of a BFV round (masking's, or distributed DP's with noise)."""
    if mechanism is not None:
        return distributed_dp.fixed_point(
            bits=bits, clip_norm=clip_norm, num_clients=num_clients, mechanism=mechanism
        )
    return secagg_quantize.fixed_point(
        bits=bits, clip_norm=clip_norm, num_clients=num_clients, max_weight=max_weight
    )


def encode_bfv(
    update: np.ndarray,
    weight: int,
    fp: secagg_quantize.FixedPoint,
    mechanism: distributed_dp.Skellam | None,
    generator: np.random.Generator,
) -> np.ndarray:
    """``[w q, w]`` (or ``[q + noise, 1]`` with distributed DP) as signed int64, what a BFV
    client encrypts: masking's ring encoding read as signed ``bits``-bit integers."""
    if mechanism is not None:
        ring = distributed_dp.encode(update, fp, mechanism, generator)
    else:
        ring = secagg_quantize.encode(update, weight, fp, generator)
    return secagg_quantize.from_ring(ring, fp.bits)


def plain_dtype(scheme: str, bits: int) -> torch.dtype:
    """The dtype of a decryptor's plaintext on the wire (:func:`wire_plain`)."""
    if scheme == BFV:
        return torch.int32 if bits <= 32 else torch.int64
    return torch.float64


def wire_plain(plain: np.ndarray, scheme: str, bits: int) -> np.ndarray:
    """A decrypted sum as a decryptor sends it: for BFV its residues modulo ``2^bits`` (all that
    decoding uses), as int32 (the two's-complement view of the uint32 residues) when ``bits <=
    32``, so the reply is half the size of the 41-bit signed plaintext in int64; CKKS's floats
    as they are."""
    if scheme != BFV:
        return np.asarray(plain, dtype=np.float64)
    ring = secagg_quantize.to_ring(np.asarray(plain), bits)
    if bits <= 32:
        return ring.astype(np.uint32).view(np.int32)
    return ring.astype(np.uint64).view(np.int64)


def plain_digest(wire: np.ndarray) -> bytes:
    """SHA-256 of a decryptor's plaintext as it goes on the wire (little-endian bytes of
    :func:`wire_plain`'s array): what a second decryptor sends instead of the plaintext."""
    little = np.ascontiguousarray(wire, dtype=wire.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).digest()


def decode_bfv(plain: np.ndarray, fp: secagg_quantize.FixedPoint) -> secagg_quantize.DecodedSum:
    """The decrypted integer sum (or its residues, :func:`wire_plain`) reduced into the ring and
    decoded (as masking decodes)."""
    return secagg_quantize.decode_sum(secagg_quantize.to_ring(plain, fp.bits), fp)


def encode_ckks(update: np.ndarray, weight: int, clip_norm: float, max_weight: int) -> np.ndarray:
    """``[w x / W, w / W]`` in float64 for an update clipped to ``clip_norm`` (``w`` capped at
    ``W = max_weight``): every entry at most ``clip_norm`` in magnitude, whatever the weights."""
    w = min(int(weight), max_weight)
    if w < 1:
        raise ValueError(f"A client's weight must be positive, got {weight}.")
    share = w / max_weight
    return np.append(secagg_quantize.clip(update, clip_norm) * share, share)


def decode_ckks(plain: np.ndarray, max_weight: int) -> secagg_quantize.DecodedSum:
    """The inverse of :func:`encode_ckks` for a sum: ``(sum w x, round(sum w))``."""
    values = np.asarray(plain, dtype=np.float64) * max_weight
    return secagg_quantize.DecodedSum(values[:-1], int(round(float(values[-1]))))
