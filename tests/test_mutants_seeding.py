"""The seeded generators' 62-bit seeds (found by mutation testing)."""

from __future__ import annotations

import numpy as np
import torch

from fedguard.algorithms import seeding


def test_seed_is_two_seed_sequence_words_in_62_bits() -> None:
    for entropy in ((1, 2, 3), (0,), (12345, 7, 0x5EED)):
        w0, w1 = (int(w) for w in np.random.SeedSequence(list(entropy)).generate_state(2))
        expected = w0 * 2**31 + w1 // 2  # the high word shifted by 31, the low one halved
        g = seeding.generator(*entropy)
        assert g.initial_seed() == expected
        assert expected < 2**63 and expected >= 2**31  # both words count
    a = torch.rand(3, generator=seeding.generator(5, 1))
    b = torch.rand(3, generator=seeding.generator(5, 2))
    assert not torch.equal(a, b)
    torch.testing.assert_close(torch.rand(3, generator=seeding.generator(5, 1)), a)
