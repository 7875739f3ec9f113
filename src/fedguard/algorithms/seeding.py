"""Seeded torch generators for simulation: one stream per (run seed, round or client, purpose)."""

from __future__ import annotations

import numpy as np
import torch


def generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded with 62 bits mixed from ``entropy`` by NumPy's SeedSequence.

    Streams for different purposes (a round's DP noise, an attacker's poisoned images) take a
    distinct constant among the entropy words, so they never coincide, and a resumed run draws
    what an uninterrupted one would have drawn.
    """
    words = np.random.SeedSequence(list(entropy)).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
