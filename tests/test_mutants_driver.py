"""The round driver's seeded sampling and seeds, pinned to their documented streams (found by
mutation testing): a resumed or deployed run must draw exactly what the simulator drew."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.protocol import driver


def test_client_and_graph_seeds_are_31_bit_seed_sequence_words() -> None:
    for seed, round_, cid in ((0, 1, 2), (123, 45, 678), (2**40, 3, 9)):
        word = int(np.random.SeedSequence([seed, round_, cid]).generate_state(1)[0])
        assert driver.client_seed(seed, round_, cid) == word // 2
        gword = int(np.random.SeedSequence([seed, round_, 0x6A5]).generate_state(1)[0])
        assert driver.graph_seed(seed, round_) == gword // 2
    seeds = [driver.client_seed(7, 1, c) for c in range(200)]
    assert all(0 <= s < 2**31 for s in seeds) and max(seeds) >= 2**30
    assert driver.graph_seed(7, 1) != driver.graph_seed(7, 2)


def test_poisson_sample_uses_its_own_stream_in_ascending_order() -> None:
    ids = [9, 3, 7, 1, 5, 11, 13, 0]
    u = np.random.default_rng([4, 2, 0x5A4D]).random(len(ids))
    expected = [c for c, x in zip(sorted(ids), u, strict=True) if x < 0.4]
    assert driver.poisson_sample(ids, 0.4, seed=4, round_=2) == expected
    assert driver.poisson_sample(ids, 1.0, seed=4, round_=2) == sorted(ids)
    assert driver.poisson_sample(ids, 0.0, seed=4, round_=2) == []
    many = driver.poisson_sample(list(range(20_000)), 0.25, seed=1, round_=1)
    assert len(many) == pytest.approx(5000, abs=250)


def test_sample_clients_is_a_seeded_choice_without_replacement() -> None:
    ids = [10, 20, 30, 40, 50, 60]
    rng = np.random.default_rng([5, 3, 0x5A])
    expected = sorted(int(c) for c in rng.choice(np.asarray(ids), size=3, replace=False))
    got = driver.sample_clients(ids, 3, seed=5, round_=3)
    assert got == expected and all(isinstance(c, int) for c in got)
    assert driver.sample_clients(ids, 6, seed=5, round_=3) == ids  # everyone, once
    assert driver.sample_clients(ids, 0, seed=5, round_=3) == []
    with pytest.raises(ValueError, match="Cannot sample 7 clients from 6"):
        driver.sample_clients(ids, 7, seed=5, round_=3)
    rounds = {tuple(driver.sample_clients(list(range(100)), 5, seed=5, round_=r)) for r in range(5)}
    assert len(rounds) == 5
