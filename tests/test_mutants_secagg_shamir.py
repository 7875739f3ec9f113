"""Shamir sharing over GF(2^31 - 1) with hand-computed numbers (found by mutation testing).

The random coefficients come from a fixed byte string, so every share is a known polynomial value.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.algorithms.secagg import shamir as sh

P = 2**31 - 1


def _words(*values: int):
    """A ``random_bytes`` that yields these 64-bit little-endian words, then zeros."""
    data = b"".join(int(v).to_bytes(8, "little") for v in values)

    def random_bytes(n: int) -> bytes:
        return (data + bytes(n))[:n]

    return random_bytes


def test_chunks_are_big_endian_three_byte_words() -> None:
    assert [sh.num_chunks(n) for n in (0, 1, 3, 4, 6, 32)] == [0, 1, 1, 2, 2, 11]
    secrets = np.frombuffer(b"\x01\x02\x03\x04\xff\x00\x00\x00", dtype=np.uint8).reshape(2, 4)
    chunks = sh._to_chunks(secrets)
    np.testing.assert_array_equal(chunks, [[0x010203, 0x040000], [0xFF0000, 0]])
    np.testing.assert_array_equal(sh._from_chunks(chunks, 4), secrets)
    assert sh._from_chunks(chunks, 4).dtype == np.uint8
    np.testing.assert_array_equal(sh._from_chunks(np.array([[0xABCDEF]]), 2), [[0xAB, 0xCD]])


def test_random_elements_are_words_reduced_mod_p() -> None:
    out = sh._random_elements((1, 3), _words(P, P + 5, 2**64 - 1))
    np.testing.assert_array_equal(out, [[0, 5, 3]])  # 2^64 = 4 (mod 2^31 - 1)
    assert out.dtype == np.int64 and out.shape == (1, 3)


def test_split_evaluates_the_polynomial_at_each_point() -> None:
    k = 0x010203
    # threshold 1: no randomness, every share is the secret
    np.testing.assert_array_equal(sh.split([b"\x01\x02\x03"], [1, 2, 5], 1, _words()), [[[k]] * 3])
    # threshold 2: f(x) = k + 7 x
    two = sh.split([b"\x01\x02\x03"], [1, 3, P - 1], 2, _words(7))
    np.testing.assert_array_equal(two[0, :, 0], [k + 7, k + 21, (k - 7) % P])
    # threshold 3: coefficients [3, 5] are of x and x^2: f(x) = k + 3 x + 5 x^2
    three = sh.split([b"\x01\x02\x03"], [1, 2, 10], 3, _words(3, 5))
    np.testing.assert_array_equal(three[0, :, 0], [k + 8, k + 26, k + 530])
    # several secrets and chunks: one coefficient per secret and chunk
    many = sh.split(
        [b"\x00\x00\x01\x00\x00\x02", b"\x00\x00\x03\x00\x00\x04"], [2, 3], 2, _words(1, 2, 3, 4)
    )
    np.testing.assert_array_equal(many[:, 0], [[1 + 2, 2 + 4], [3 + 6, 4 + 8]])
    np.testing.assert_array_equal(many[:, 1], [[1 + 3, 2 + 6], [3 + 9, 4 + 12]])


def test_split_checks_its_arguments() -> None:
    rb = _words()
    for secrets in ([], [b"ab", b"abc"]):
        with pytest.raises(ValueError, match="equal length"):
            sh.split(secrets, [1, 2], 1, rb)
    for points in ([1, 1], [0, 1], [1, P], [-1, 2]):
        with pytest.raises(ValueError, match="distinct"):
            sh.split([b"abc"], points, 1, rb)
    for threshold in (0, 3):
        with pytest.raises(ValueError, match="threshold"):
            sh.split([b"abc"], [1, 2], threshold, rb)
    assert sh.split([b"abc"], [1, P - 1], 2, rb).shape == (1, 2, 1)


def test_pow_and_prod_mod() -> None:
    np.testing.assert_array_equal(sh._pow_mod(np.array([2, 3]), 10), [1024, 59049])
    np.testing.assert_array_equal(sh._pow_mod(np.array([5, P + 2]), 0), [1, 1])
    np.testing.assert_array_equal(sh._pow_mod(np.array([P + 2]), 3), [8])
    np.testing.assert_array_equal(sh._pow_mod(np.array([2]), 31), [1])  # 2^31 = 1 (mod p)
    values = np.array([[2, 3], [4, 5]])
    np.testing.assert_array_equal(sh._prod_mod(values, 0), [8, 15])
    np.testing.assert_array_equal(sh._prod_mod(values, 1), [6, 20])
    np.testing.assert_array_equal(sh._prod_mod(np.array([P - 1, P - 1, 2]), 0), 2)


def test_lagrange_coefficients_at_zero() -> None:
    np.testing.assert_array_equal(sh.lagrange_at_zero([1, 2]), [2, P - 1])
    np.testing.assert_array_equal(sh.lagrange_at_zero([1, 2, 3]), [3, P - 3, 1])
    np.testing.assert_array_equal(sh.lagrange_at_zero([3, 1, 2]), [1, 3, P - 3])
    batch = sh.lagrange_at_zero(np.array([[1, 2], [2, 4]]))
    assert batch.shape == (2, 2)
    np.testing.assert_array_equal(batch, [[2, P - 1], [2, P - 1]])  # scale-free
    with pytest.raises(ValueError, match="distinct"):
        sh.lagrange_at_zero([4, 2, 4])


def test_reconstruct_from_threshold_shares_and_not_from_fewer() -> None:
    secret = b"\x10\x20\x30\x40"
    shares = sh.split([secret], [1, 2, 3, 4], 3, _words(11, 13, 17, 19))
    assert sh.reconstruct([1, 2, 3, 4], shares, 4) == [secret]
    assert sh.reconstruct([2, 4, 3], shares[:, [1, 3, 2]], 4) == [secret]
    assert sh.reconstruct([1, 2], shares[:, :2], 4) != [secret]
    # per-secret holders [S, T]
    both = sh.split([secret, b"\x01\x02\x03\x04"], [1, 2, 3], 2, _words(5, 6, 7, 8))
    picked = np.stack([both[0, [0, 2]], both[1, [1, 2]]])
    assert sh.reconstruct(np.array([[1, 3], [2, 3]]), picked, 4) == [secret, b"\x01\x02\x03\x04"]
    with pytest.raises(ValueError, match="Expected shares"):
        sh.reconstruct([1, 2], shares[0], 4)
    with pytest.raises(ValueError, match="Expected shares"):
        sh.reconstruct([1, 2, 3], shares[:, :2], 4)


def test_share_bytes_round_trip_and_checks() -> None:
    assert sh.share_to_bytes(np.array([1, 2])) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    np.testing.assert_array_equal(
        sh.share_from_bytes(b"\x01\x00\x00\x00\x02\x00\x00\x00", 6), [1, 2]
    )
    top = (P - 1).to_bytes(4, "little")
    np.testing.assert_array_equal(sh.share_from_bytes(top, 3), [P - 1])
    with pytest.raises(ValueError, match="outside the field"):
        sh.share_from_bytes(P.to_bytes(4, "little"), 3)
    with pytest.raises(ValueError, match="has 4 bytes, got 8"):
        sh.share_from_bytes(bytes(8), 3)
    with pytest.raises(ValueError, match="same number of shares"):
        sh.shares_from_bytes([[bytes(4), bytes(4)], [bytes(4)]], 3)
    rows = sh.shares_from_bytes([[top, bytes(4)], [bytes(4), top]], 3)
    assert rows.shape == (2, 2, 1) and rows.dtype == np.int64
    assert rows[0, 0, 0] == P - 1 and rows[1, 1, 0] == P - 1 and rows[0, 1, 0] == 0


def test_shares_at_large_points_are_exact_int64() -> None:
    """Points near p: the Horner steps multiply values near 2^31 by points near 2^31, exact only
    in integers (float64 would round products of 2^62)."""
    points = [P - 1, P - 2, 123_456_789]
    secrets = [bytes(range(10)), bytes(range(100, 110))]
    shares = sh.split(secrets, points, 2, _words(2**40 + 17, 99, 2**50 + 3, 5, 7, 11, 13, 1))
    assert shares.dtype == np.int64 and shares.shape == (2, 3, sh.num_chunks(10))
    assert sh.reconstruct(points[:2], shares[:, :2], 10) == secrets
    assert sh.reconstruct(points[1:], shares[:, 1:], 10) == secrets
