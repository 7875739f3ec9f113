"""Exact numbers for the fixed-point encoding of secure aggregation (found by mutation testing).

Every expected value is worked out by hand from the overflow bound in the module docstring:
``levels = floor((2^(b-1) - 1) / (n W)) - 1`` and ``scale = levels / C``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.algorithms.secagg import quantize as sq


def _gen(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_scale_is_the_overflow_bound_in_levels_per_unit_of_clip() -> None:
    fp = sq.fixed_point(bits=16, clip_norm=2.0, num_clients=3, max_weight=5)
    # 32767 // 15 = 2184, minus one level for the rounding: 2183 levels over a clip of 2
    assert (fp.bits, fp.clip_norm, fp.max_weight) == (16, 2.0, 5)
    assert fp.scale == 1091.5
    assert fp.dtype == np.dtype("<u4")
    # float64 exactness caps the levels at 2^52
    wide = sq.fixed_point(bits=64, clip_norm=4.0, num_clients=1, max_weight=1)
    assert wide.scale == 2.0**52 / 4.0
    assert wide.dtype == np.dtype("<u8")


def test_the_smallest_ring_that_holds_the_sum_is_accepted_and_one_client_more_is_not() -> None:
    # 8 bits: 127 // 63 = 2, one level left; 127 // 64 = 1, none
    assert sq.fixed_point(bits=8, clip_norm=0.5, num_clients=63, max_weight=1).scale == 2.0
    with pytest.raises(ValueError, match="cannot hold"):
        sq.fixed_point(bits=8, clip_norm=0.5, num_clients=64, max_weight=1)
    assert sq.fixed_point(bits=8, clip_norm=0.5, num_clients=21, max_weight=3).scale == 2.0
    with pytest.raises(ValueError, match="cannot hold"):
        sq.fixed_point(bits=8, clip_norm=0.5, num_clients=22, max_weight=3)  # 127 // 66 - 1 = 0


def test_fixed_point_refuses_non_positive_settings() -> None:
    for kwargs in (
        dict(clip_norm=0.0, num_clients=2, max_weight=1),
        dict(clip_norm=-1.0, num_clients=2, max_weight=1),
        dict(clip_norm=1.0, num_clients=0, max_weight=1),
        dict(clip_norm=1.0, num_clients=2, max_weight=0),
    ):
        with pytest.raises(ValueError):
            sq.fixed_point(bits=32, **kwargs)
    with pytest.raises(ValueError, match="1 to 64 bits"):
        sq.fixed_point(bits=65, clip_norm=1.0, num_clients=1, max_weight=1)
    # the smallest legal values pass
    assert sq.fixed_point(bits=32, clip_norm=1e-9, num_clients=1, max_weight=1).scale > 0


def test_clip_keeps_short_and_boundary_updates_and_shortens_long_ones() -> None:
    short = np.array([3.0, 4.0])  # norm 5, exactly
    np.testing.assert_array_equal(sq.clip(short, 5.0), short)  # exactly at the bound: kept
    np.testing.assert_array_equal(sq.clip(short, 20.0), short)
    np.testing.assert_allclose(sq.clip(short, 2.0), [1.2, 1.6], rtol=1e-15)
    assert sq.clip(np.array([1, 2], dtype=np.int32), 10.0).dtype == np.float64


def test_stochastic_round_is_unbiased_leaves_integers_alone_and_copies() -> None:
    values = np.array([2.0, -3.0, 0.0, 7.0])
    np.testing.assert_array_equal(sq.stochastic_round(values, _gen()), [2, -3, 0, 7])
    v = np.full(200_000, 2.25)
    out = sq.stochastic_round(v, _gen(1))
    assert out.dtype == np.int64
    assert set(np.unique(out).tolist()) == {2, 3}
    assert out.mean() == pytest.approx(2.25, abs=0.005)
    neg = sq.stochastic_round(np.full(200_000, -1.75), _gen(2))
    assert set(np.unique(neg).tolist()) == {-2, -1}
    assert neg.mean() == pytest.approx(-1.75, abs=0.005)
    np.testing.assert_array_equal(v, 2.25)  # the caller's array is untouched
    ints = np.array([1, -2], dtype=np.int64)
    np.testing.assert_array_equal(sq.stochastic_round(ints, _gen()), [1, -2])


def test_encode_is_weight_times_levels_with_the_weight_appended_in_the_ring() -> None:
    fp = sq.fixed_point(bits=32, clip_norm=1.0, num_clients=4, max_weight=4)
    assert fp.scale == 134217726.0  # (2^31 - 1) // 16 - 1
    x = np.array([0.5, -0.5, 0.0], dtype=np.float32)  # scaled: exact integers, no rounding
    out = sq.encode(x, 3, fp, _gen())
    assert out.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(out, [201326589, 2**32 - 201326589, 0, 3])
    # the weight is capped at max_weight
    capped = sq.encode(x, 10, fp, _gen())
    np.testing.assert_array_equal(capped, [268435452, 2**32 - 268435452, 0, 4])
    one = sq.encode(x, 1, fp, _gen())
    np.testing.assert_array_equal(one, [67108863, 2**32 - 67108863, 0, 1])
    with pytest.raises(ValueError, match="weight must be positive"):
        sq.encode(x, 0, fp, _gen())


def test_encode_clips_long_updates_and_masks_narrow_rings() -> None:
    fp = sq.fixed_point(bits=20, clip_norm=1.0, num_clients=2, max_weight=1)
    assert fp.scale == 262142.0  # (2^19 - 1) // 2 - 1
    out = sq.encode(np.array([-0.5, 0.5]), 1, fp, _gen())
    np.testing.assert_array_equal(out, [2**20 - 131071, 131071, 1])
    # norm 5 > 1: clipped to [0.6, 0.8] before scaling (values within one level of 0.6 s, 0.8 s)
    long = sq.encode(np.array([3, 4], dtype=np.int64), 1, fp, _gen())
    signed = sq.from_ring(long, 20)
    assert abs(signed[0] - 0.6 * fp.scale) <= 1 and abs(signed[1] - 0.8 * fp.scale) <= 1
    assert signed[2] == 1
    # exactly at the clip: not shortened
    edge = sq.encode(np.array([0.0, 1.0]), 1, fp, _gen())
    np.testing.assert_array_equal(edge, [0, 262142, 1])
    # a 64-bit ring keeps the two's complement words
    fp64 = sq.fixed_point(bits=64, clip_norm=1.0, num_clients=2, max_weight=2)
    w64 = sq.encode(np.array([-0.5]), 2, fp64, _gen())
    assert w64.dtype == np.dtype("<u8")
    assert int(sq.from_ring(w64, 64)[0]) == -2 * int(0.5 * fp64.scale)


def test_ring_round_trip_of_signed_values() -> None:
    np.testing.assert_array_equal(
        sq.to_ring(np.array([-1, 5, -(2**19)]), 20), [2**20 - 1, 5, 2**19]
    )
    assert sq.to_ring(np.array([-1]), 20).dtype == np.dtype("<u4")
    back = sq.from_ring(np.array([2**20 - 1, 5, 2**19, 2**19 - 1], dtype=np.uint32), 20)
    np.testing.assert_array_equal(back, [-1, 5, -(2**19), 2**19 - 1])
    assert back.dtype == np.int64
    # bits above the ring are ignored
    np.testing.assert_array_equal(sq.from_ring(np.array([2**20 + 3], dtype=np.uint32), 20), [3])
    full = sq.from_ring(np.array([2**64 - 1, 2**63], dtype=np.uint64), 64)
    np.testing.assert_array_equal(full, [-1, -(2**63)])
    np.testing.assert_array_equal(sq.to_ring(np.array([-7]), 64), [2**64 - 7])


def test_decode_sum_recovers_the_weighted_total_and_the_total_weight() -> None:
    fp = sq.fixed_point(bits=24, clip_norm=1.0, num_clients=3, max_weight=2)
    assert fp.scale == 1398100.0  # (2^23 - 1) // 6 - 1
    a = sq.encode(np.array([0.5, -0.25]), 2, fp, _gen(0))
    b = sq.encode(np.array([-0.75, 0.5]), 1, fp, _gen(1))
    ring_sum = (a.astype(np.uint64) + b.astype(np.uint64)) & np.uint64(2**24 - 1)
    out = sq.decode_sum(ring_sum.astype(np.uint32), fp)
    assert out.weight == 3
    np.testing.assert_allclose(out.total, [2 * 0.5 - 0.75, 2 * -0.25 + 0.5], atol=2 / fp.scale)
    assert out.total.dtype == np.float64


def test_one_client_of_weight_one_in_eight_bits_has_126_levels() -> None:
    # floor((2^7 - 1) / 1) - 1 = 126
    assert sq.fixed_point(bits=8, clip_norm=1.0, num_clients=1, max_weight=1).scale == 126.0


def test_every_coordinate_is_rounded_with_its_own_uniform() -> None:
    """Values half-way between two levels round up with probability 1/2 each, independently:
    about half of 10,000 go up (one shared uniform would move them all the same way)."""
    fp = sq.fixed_point(bits=32, clip_norm=1.0, num_clients=1, max_weight=1)
    update = np.full(10_000, 0.5 / fp.scale)  # half a level each; norm 50 / scale << 1
    out = sq.encode(update, 1, fp, _gen(4))
    ups = out[:-1].astype(np.int64)
    assert set(ups.tolist()) == {0, 1}
    assert abs(ups.mean() - 0.5) < 0.02
