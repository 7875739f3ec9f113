"""Secure-aggregation math: Shamir sharing, fixed-point encoding, masks, AEAD, masking graph."""

from __future__ import annotations

import os
from itertools import combinations

import numpy as np
import pytest

from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import graph as secagg_graph
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.algorithms.secagg import shamir as secagg_shamir
from fedguard.protocol import secagg


def _random_bytes(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def test_any_t_shares_reconstruct_and_t_minus_one_do_not() -> None:
    secrets = [bytes(range(32)), b"\xff" * 32]
    points = [3, 5, 8, 13, 21, 34, 55]
    t = 4
    shares = secagg_shamir.split(secrets, points, t, _random_bytes(0))
    assert shares.shape == (2, 7, secagg_shamir.num_chunks(32))
    for subset in combinations(range(len(points)), t):
        xs = [points[i] for i in subset]
        assert secagg_shamir.reconstruct(xs, shares[:, list(subset)], 32) == secrets
    for subset in combinations(range(len(points)), t - 1):
        xs = [points[i] for i in subset]
        got = secagg_shamir.reconstruct(xs, shares[:, list(subset)], 32)
        assert got[0] != secrets[0] and got[1] != secrets[1]


def test_batched_reconstruction_uses_each_secrets_own_holders() -> None:
    """Owners with different holder sets (SecAgg+ neighbourhoods) in one interpolation."""
    secrets = [os.urandom(32) for _ in range(5)]
    points = [2, 3, 5, 7, 11, 13]
    shares = np.stack([secagg_shamir.split([s], points, 3, os.urandom)[0] for s in secrets])
    subsets = [[0, 1, 2], [3, 4, 5], [0, 2, 4], [1, 3, 5], [0, 4, 5]]
    ys = np.stack([shares[i, subset] for i, subset in enumerate(subsets)])
    xs = [[points[j] for j in subset] for subset in subsets]
    assert secagg_shamir.reconstruct(xs, ys, 32) == secrets
    one_by_one = [secagg_shamir.lagrange_at_zero(row) for row in xs]
    assert np.array_equal(secagg_shamir.lagrange_at_zero(xs), np.stack(one_by_one))
    # l_i for points 1, 2, 3: 3, -3, 1 (mod p)
    p = secagg_shamir.PRIME
    assert secagg_shamir.lagrange_at_zero([1, 2, 3]).tolist() == [3, p - 3, 1]
    with pytest.raises(ValueError, match="distinct"):
        secagg_shamir.lagrange_at_zero([[1, 2, 3], [4, 4, 5]])
    with pytest.raises(ValueError, match="points of shape"):
        secagg_shamir.reconstruct(xs[:2], ys, 32)


def test_shares_round_trip_through_bytes_and_threshold_one_is_the_secret() -> None:
    secret = os.urandom(32)
    shares = secagg_shamir.split([secret], [1, 2], 1, os.urandom)
    assert np.array_equal(shares[0, 0], shares[0, 1])  # degree 0: every share is the secret
    wire = secagg_shamir.share_to_bytes(shares[0, 1])
    assert len(wire) == 44
    back = secagg_shamir.share_from_bytes(wire, 32)
    assert secagg_shamir.reconstruct([2], back[None, None, :], 32) == [secret]
    with pytest.raises(ValueError, match="has 44 bytes, got 43"):
        secagg_shamir.share_from_bytes(wire[:-1], 32)


def test_shamir_refuses_bad_points_and_thresholds() -> None:
    with pytest.raises(ValueError, match="distinct"):
        secagg_shamir.split([b"a" * 32], [1, 1], 1, os.urandom)
    with pytest.raises(ValueError, match="between 1 and the 2 holders, got 3"):
        secagg_shamir.split([b"a" * 32], [1, 2], 3, os.urandom)


def test_fixed_point_sum_of_worst_case_updates_does_not_overflow() -> None:
    n, w, clip = 7, 50, 2.0
    fp = secagg_quantize.fixed_point(bits=16, clip_norm=clip, num_clients=n, max_weight=w)
    assert fp.scale == ((2**15 - 1) // (n * w) - 1) / clip
    worst = np.array([clip, -clip, 0.0])  # norm above the clip: clipped to [c/sqrt2, -c/sqrt2, 0]
    rng = np.random.default_rng(0)
    ring = sum(secagg_quantize.encode(worst, w, fp, rng).astype(np.uint64) for _ in range(n))
    decoded = secagg_quantize.decode_sum(ring & np.uint64(0xFFFF), fp)
    expected = n * w * np.array([clip, -clip, 0.0]) / np.sqrt(2)
    assert decoded.weight == n * w
    assert np.allclose(decoded.total, expected, atol=n * w / fp.scale)


def test_stochastic_rounding_is_unbiased() -> None:
    values = np.full(200_000, 0.3)
    rounded = secagg_quantize.stochastic_round(values, np.random.default_rng(1))
    assert set(np.unique(rounded)) == {0, 1}
    assert abs(rounded.mean() - 0.3) < 0.005


def test_fixed_point_refuses_a_ring_too_small() -> None:
    with pytest.raises(ValueError, match="8 bits cannot hold the sum of 100 updates"):
        secagg_quantize.fixed_point(bits=8, clip_norm=1.0, num_clients=100, max_weight=1)


@pytest.mark.parametrize(("bits", "dim"), [(32, 100_003), (64, 50_001), (20, 7)])
def test_masks_are_the_aes_ctr_keystream_across_chunks(bits: int, dim: int) -> None:
    """The chunked expansion is one AES-256-CTR stream (zero nonce), whatever the length."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    dtype = secagg_crypto.ring_dtype(bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    whole = np.frombuffer(encryptor.update(bytes(dim * dtype.itemsize)), dtype=dtype)
    assert np.array_equal(
        secagg_crypto.expand_mask(seed, dim, bits), whole & secagg_crypto.ring_mask(bits)
    )
    x = np.arange(dim, dtype=dtype)
    secagg_crypto.add_mask(x, seed)
    assert np.array_equal(x, np.arange(dim, dtype=dtype) + whole)
    secagg_crypto.add_mask(x, seed, subtract=True)
    assert np.array_equal(x, np.arange(dim, dtype=dtype))
    with pytest.raises(ValueError, match="uint32 or uint64"):
        secagg_crypto.add_mask(x.astype(np.int64), seed)


@pytest.mark.parametrize("bits", [12, 32, 64])
def test_masks_cancel_in_the_ring(bits: int) -> None:
    a, b = secagg_crypto.key_pair(os.urandom), secagg_crypto.key_pair(os.urandom)
    s_ab = secagg_crypto.mask_seed(a.private, b.public, 4, 1, 2)
    assert s_ab == secagg_crypto.mask_seed(b.private, a.public, 4, 2, 1)
    assert s_ab != secagg_crypto.mask_seed(a.private, b.public, 5, 1, 2)
    x = secagg_quantize.to_ring(np.array([-3, 0, 7, 2**10]), bits)
    mask = secagg_crypto.expand_mask(s_ab, 4, bits)
    assert mask.max() <= (1 << bits) - 1
    y = (x + mask) & secagg_crypto.ring_mask(bits)
    back = (y - secagg_crypto.expand_mask(s_ab, 4, bits)) & secagg_crypto.ring_mask(bits)
    assert secagg_quantize.from_ring(back, bits).tolist() == [-3, 0, 7, 2**10]


def test_share_bundles_reject_tampering_and_replay() -> None:
    u, v, w = (secagg_crypto.key_pair(os.urandom) for _ in range(3))
    key_uv = secagg_crypto.share_key(u.private, v.public, 2, 10, 11)
    assert key_uv == secagg_crypto.share_key(v.private, u.public, 2, 11, 10)
    ct = secagg_crypto.encrypt_bundle(
        key_uv, b"shares", round_=2, sender=10, receiver=11, random_bytes=os.urandom
    )
    plain = secagg_crypto.decrypt_bundle(key_uv, ct, round_=2, sender=10, receiver=11)
    assert plain == b"shares"
    flipped = bytearray(ct)
    flipped[-3] ^= 0x01
    with pytest.raises(secagg_crypto.CryptoError, match="failed authentication"):
        secagg_crypto.decrypt_bundle(key_uv, bytes(flipped), round_=2, sender=10, receiver=11)
    with pytest.raises(secagg_crypto.CryptoError, match="round 3 failed authentication"):
        secagg_crypto.decrypt_bundle(key_uv, ct, round_=3, sender=10, receiver=11)
    with pytest.raises(secagg_crypto.CryptoError, match="from client 11 to client 10"):
        secagg_crypto.decrypt_bundle(key_uv, ct, round_=2, sender=11, receiver=10)
    key_uw = secagg_crypto.share_key(w.private, u.public, 2, 12, 10)
    with pytest.raises(secagg_crypto.CryptoError, match="to client 12"):
        secagg_crypto.decrypt_bundle(key_uw, ct, round_=2, sender=10, receiver=12)


def test_signatures_bind_keys_to_identities() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    identity = ed25519.Ed25519PrivateKey.generate()
    message = secagg_crypto.keys_message(1, bytes(32), 4, b"c" * 32, b"s" * 32)
    signature = secagg_crypto.sign(identity, message)
    secagg_crypto.verify(identity.public_key(), signature, message, client_id=4)
    other = secagg_crypto.keys_message(1, bytes(32), 4, b"c" * 32, b"S" * 32)
    with pytest.raises(secagg_crypto.CryptoError, match="client 4 carry an invalid signature"):
        secagg_crypto.verify(identity.public_key(), signature, other, client_id=4)


@pytest.mark.parametrize(("n", "k"), [(10, 3), (9, 3), (12, 4), (8, 7), (7, 6), (100, 7)])
def test_harary_graph_is_regular_symmetric_and_seeded(n: int, k: int) -> None:
    ids = list(range(100, 100 + n))
    graph = secagg_graph.harary_graph(ids, k, seed=5)
    degree = secagg_graph.feasible_degree(n, k)
    secagg_graph.check_symmetric(graph)
    assert {len(p) for p in graph.values()} == {degree}
    assert graph == secagg_graph.harary_graph(ids, k, seed=5)
    if degree == n - 1:
        assert all(graph[u] == set(ids) - {u} for u in ids)
    else:
        assert graph != secagg_graph.harary_graph(ids, k, seed=6)


def test_default_degree_and_threshold() -> None:
    assert secagg_graph.default_degree(100) == 7
    assert secagg_graph.default_degree(9) == 4  # ceil(log2 9) = 4
    assert secagg_graph.default_degree(3) == 2  # complete graph
    assert secagg_graph.default_threshold(8) == 5 and secagg_graph.default_threshold(7) == 4


def test_tolerant_degree_meets_the_failure_target_with_a_majority_threshold() -> None:
    # k = 7, t = 5 at n = 100: a neighbourhood of 8 fails when 4 or more drop (p = 0.1)
    assert secagg_graph.neighbourhood_failure(7, 0.1) == pytest.approx(0.0050244, rel=1e-4)
    k = secagg_graph.tolerant_degree(100, 0.1)
    assert (k, secagg_graph.default_threshold(k + 1)) == (30, 16)
    assert 100 * secagg_graph.neighbourhood_failure(k, 0.1) <= 1e-6
    assert 100 * secagg_graph.neighbourhood_failure(k - 1, 0.1) > 1e-6
    assert secagg_graph.tolerant_degree(100, 0.0) == 7  # never below ceil(log2 n)
    assert secagg_graph.tolerant_degree(10, 0.1) == 9  # no sparse graph suffices: complete
    setup = secagg.Settings(secagg.Mode.SECAGG_PLUS, clip_norm=1.0, max_weight=1).setup(
        1, list(range(100)), graph_seed=0, dim=3
    )
    assert (setup.neighbours, setup.threshold) == (30, 16)
