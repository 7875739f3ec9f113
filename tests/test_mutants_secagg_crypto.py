"""Secure aggregation's masks and share encryption at their edges (found by mutation testing):
the keystream against an independent AES-CTR, a fresh thread's scratch buffer, the shortest
ciphertext, the ring's widths."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedguard.algorithms.secagg import crypto

SEED = bytes(range(7, 7 + crypto.KEY_BYTES))


def _keystream_words(seed: bytes, n: int) -> np.ndarray:
    """AES-256-CTR with a zero nonce over ``4 n`` zero bytes, as little-endian uint32 words."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    return np.frombuffer(stream, dtype="<u4")


def test_masks_are_added_to_contiguous_vectors_only() -> None:
    out = np.zeros(8, dtype="<u4")
    with pytest.raises(ValueError, match="contiguous vectors"):
        crypto.add_mask(out[::2], SEED)
    with pytest.raises(ValueError, match="contiguous vectors"):
        crypto.add_mask(np.zeros((2, 4), dtype="<u4"), SEED)
    assert not out.any()


def test_a_fresh_thread_expands_the_same_mask_over_more_than_a_chunk() -> None:
    """Each thread gets its own keystream buffer (made on its first mask): one that spans a
    whole 256 KB chunk and more gives the AES-CTR keystream, as in the main thread."""
    n = crypto._CHUNK_BYTES // 4 + 5
    reference = _keystream_words(SEED, n)
    assert np.array_equal(crypto.expand_mask(SEED, n, 32), reference)
    got: dict[str, np.ndarray] = {}
    failed: list[BaseException] = []

    def work() -> None:
        try:
            got["mask"] = crypto.expand_mask(SEED, n, 32)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not failed and np.array_equal(got["mask"], reference)


def test_the_shortest_ciphertext_is_an_empty_bundle() -> None:
    key = bytes(range(crypto.KEY_BYTES))
    sealed = crypto.encrypt_bundle(
        key, b"", round_=3, sender=1, receiver=2, random_bytes=lambda n: bytes(range(n))
    )
    assert len(sealed) == crypto.NONCE_BYTES + 16
    assert crypto.decrypt_bundle(key, sealed, round_=3, sender=1, receiver=2) == b""
    for short in (sealed[:-1], sealed[:5], b""):
        with pytest.raises(crypto.CryptoError, match="too short to be a ciphertext"):
            crypto.decrypt_bundle(key, short, round_=3, sender=1, receiver=2)


def test_ring_widths_from_one_to_sixty_four_bits() -> None:
    assert crypto.ring_dtype(1) == np.dtype("<u4") and crypto.ring_mask(1) == 1
    assert crypto.ring_dtype(32) == np.dtype("<u4")
    assert crypto.ring_dtype(33) == np.dtype("<u8") and crypto.ring_mask(33) == 2**33 - 1
    assert crypto.ring_dtype(64) == np.dtype("<u8")
    for bad in (0, 65):
        with pytest.raises(ValueError, match="1 to 64 bits"):
            crypto.ring_dtype(bad)
