"""The masking graph of SecAgg+ and the default thresholds.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020),
replace the complete graph of the original protocol with a random ``k``-regular graph: client
``u`` agrees pairwise masks only with its ``k`` neighbours and secret-shares its keys only among
them (plus itself), so work per client is ``O(k)`` rather than ``O(n)``. Their construction is a
Harary graph ``H(n, k)`` over a random ordering of the clients: on the random cycle every client
is joined to the ``k // 2`` nearest on each side, and, when ``k`` is odd (``n`` then even), to the
client opposite. The ordering comes from a public seed (in a verified round the hash of randomness
the clients committed to and then revealed; see :mod:`fedguard.protocol.secagg`), so every client
computes the same graph and can check the server's claims against it. ``k = n - 1`` gives the
complete graph, the original protocol (Bonawitz et al., CCS 2017).

**Default degree and threshold.** A round survives while every neighbourhood (a client and its
``k`` neighbours, the holders of its shares) keeps ``t`` members. With each client dropping
independently with probability ``p`` (the tolerated dropout rate), a neighbourhood fails with
probability ``P[Bin(k + 1, p) > k + 1 - t]``; :func:`tolerant_degree` picks the smallest feasible
``k`` for which ``n`` times that (a union bound over the neighbourhoods) is at most
``ROUND_FAILURE_TARGET = 1e-6``, with the smallest threshold the secrecy of the shares allows,
``t = floor((k + 1) / 2) + 1`` (more than half the holders, so that the server cannot obtain
both shares of a client: Bell et al., section 3), and never below ``ceil(log2 n)``. Bell et al.
prove security for ``k = O(log n)`` with constants that depend on the dropout and corruption
rates; deployments facing a malicious server should choose ``k`` from their Table 2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np


def feasible_degree(n: int, k: int) -> int:
    """``k`` raised to the nearest degree that a ``k``-regular graph on ``n`` nodes can have."""
    if n < 2:
        raise ValueError(f"A masking graph needs at least 2 clients, got {n}.")
    if k < 1:
        raise ValueError(f"The number of neighbours must be positive, got {k}.")
    k = min(k, n - 1)
    if k % 2 == 1 and n % 2 == 1:
        k += 1  # n odd: k = n - 1 is even, so k + 1 <= n - 1 here
    return k


def default_degree(n: int) -> int:
    """``ceil(log2 n)`` neighbours, made feasible (the complete graph for tiny cohorts)."""
    return feasible_degree(n, max(1, math.ceil(math.log2(max(n, 2)))))


def default_threshold(holders: int) -> int:
    """More than half of a client's share holders (its neighbours and itself)."""
    return holders // 2 + 1


ROUND_FAILURE_TARGET = 1e-6


def neighbourhood_failure(k: int, dropout_rate: float) -> float:
    """``P[Bin(k + 1, p) > k + 1 - t]``: fewer than ``t = default_threshold(k + 1)`` of a
    client's ``k + 1`` share holders survive when each drops with probability ``p``."""
    holders = k + 1
    tolerated = holders - default_threshold(holders)
    p = dropout_rate
    return math.fsum(
        math.comb(holders, j) * p**j * (1 - p) ** (holders - j)
        for j in range(tolerated + 1, holders + 1)
    )


def tolerant_degree(
    n: int, dropout_rate: float, failure_target: float = ROUND_FAILURE_TARGET
) -> int:
    """The smallest feasible ``k >= ceil(log2 n)`` with ``n P[neighbourhood fails] <= target``;
    the complete graph (``n - 1``) when no sparser graph reaches the target."""
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"The dropout rate must be in [0, 1), got {dropout_rate}.")
    k = default_degree(n)
    while k < n - 1 and n * neighbourhood_failure(k, dropout_rate) > failure_target:
        k = feasible_degree(n, k + 1)
    return k


def harary_graph(client_ids: Sequence[int], k: int, seed: int) -> dict[int, frozenset[int]]:
    """Each client's ``k`` neighbours in ``H(n, k)`` over the seed's random ordering of clients."""
    return dict(_harary(tuple(sorted(client_ids)), k, seed))


@functools.lru_cache(maxsize=16)  # a simulator asks once per simulated client per round
def _harary(ids: tuple[int, ...], k: int, seed: int) -> tuple[tuple[int, frozenset[int]], ...]:
    n = len(ids)
    k = feasible_degree(n, k)
    order = np.random.default_rng([seed, 0x6A]).permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    offsets = [d for d in range(1, k // 2 + 1)] + [-d for d in range(1, k // 2 + 1)]
    if k % 2 == 1:
        offsets.append(n // 2)
    neighbours: dict[int, frozenset[int]] = {}
    for index, cid in enumerate(ids):
        at = (position[index] + np.asarray(offsets)) % n
        neighbours[cid] = frozenset(ids[int(j)] for j in order[at])
    return tuple(neighbours.items())


def check_symmetric(graph: Mapping[int, frozenset[int]]) -> None:
    """Raise unless every edge goes both ways and no client is its own neighbour."""
    for u, peers in graph.items():
        if u in peers:
            raise ValueError(f"Client {u} is its own neighbour in the masking graph.")
        for v in peers:
            if u not in graph.get(v, frozenset()):
                raise ValueError(f"The masking graph has the edge {u}-{v} in one direction only.")
