"""Simulated Byzantine clients: which clients are malicious and what they send.

The attacks live in ``attacks_model`` (poisoned updates) and ``attacks_data`` (poisoned training
data), each citing its paper. This module names them (``Attack``), holds their hyperparameters
(``AttackConfig``), dispatches a model-poisoning attack for one round (``poison_updates``) and
picks the malicious clients of a federation reproducibly (``choose_malicious``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedguard.algorithms.attacks import model_poisoning as attacks_model
from fedguard.algorithms.robust import base as robust_base


class Attack(enum.StrEnum):
    SIGN_FLIP = "sign_flip"
    BOOST = "boost"
    GAUSSIAN = "gaussian"
    ALIE = "alie"
    IPM = "ipm"
    MIN_MAX = "min_max"
    MIN_SUM = "min_sum"
    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"
    # Low-value behaviours, to test contribution scores with (issue 18): a free rider sends the
    # global model back unchanged (a zero update) and claims its real example count; a noisy
    # client trains honestly on labels shuffled with probability ``label_noise``.
    FREE_RIDER = "free_rider"
    NOISY_CLIENT = "noisy_client"


DATA_POISONING = frozenset({Attack.LABEL_FLIP, Attack.BACKDOOR, Attack.NOISY_CLIENT})
# Behaviours that lower a client's value rather than attack the model (not Byzantine attacks:
# the robustness benchmark leaves them out; contribution scores are what measures them).
LOW_VALUE = frozenset({Attack.FREE_RIDER, Attack.NOISY_CLIENT})


@dataclass(frozen=True)
class AttackConfig:
    """An attack and its hyperparameters; fields an attack does not use are ignored by it."""

    kind: Attack
    scale: float = 1.0  # sign flipping
    factor: float = 10.0  # boosting
    std: float = 1.0  # Gaussian
    z: float | None = None  # ALIE; None: the paper's z from n and m
    epsilon: float = 0.5  # IPM
    perturbation: attacks_model.Perturbation = attacks_model.Perturbation.STD  # min-max / min-sum
    tolerance: float = 1e-5  # min-max / min-sum bisection on gamma
    label_noise: float = 0.5  # noisy client: the probability that a label joins the shuffle


def is_data_poisoning(kind: Attack) -> bool:
    """Whether the attack changes a client's training data rather than its update."""
    return kind in DATA_POISONING


def poison_updates(
    config: AttackConfig, honest: torch.Tensor, own: torch.Tensor, *, generator: torch.Generator
) -> torch.Tensor:
    """The ``[M, D]`` updates the ``M`` malicious clients send, given the round's honest ``[N, D]``.

    For ALIE without an explicit ``z``, ``n = N + M`` clients of which ``m = M`` are malicious.
    """
    kind, m = config.kind, own.shape[0]
    if is_data_poisoning(kind):
        raise robust_base.RobustnessError(
            f"{kind.value} poisons training data, not updates: use attacks_data on the client."
        )
    if kind is Attack.FREE_RIDER:
        return attacks_model.free_ride(own)
    if kind is Attack.SIGN_FLIP:
        return attacks_model.sign_flip(own, scale=config.scale)
    if kind is Attack.BOOST:
        return attacks_model.boost(own, factor=config.factor)
    if kind is Attack.GAUSSIAN:
        return attacks_model.gaussian(own, std=config.std, generator=generator)
    if kind is Attack.ALIE:
        z = config.z if config.z is not None else attacks_model.alie_z(honest.shape[0] + m, m)
        return attacks_model.alie(honest, num_malicious=m, z=z)
    if kind is Attack.IPM:
        return attacks_model.inner_product_manipulation(
            honest, num_malicious=m, epsilon=config.epsilon
        )
    find = attacks_model.min_max if kind is Attack.MIN_MAX else attacks_model.min_sum
    return find(honest, num_malicious=m, kind=config.perturbation, tolerance=config.tolerance)


def choose_malicious(client_ids: Sequence[int], fraction: float, seed: int) -> list[int]:
    """``round(fraction * n)`` of the ``n`` clients, drawn with ``seed``, sorted.

    The draw depends on the ids as a set (they are sorted first), so the same seed and the same
    federation always give the same attackers.
    """
    return choose_groups(client_ids, [fraction], seed)[0]


def choose_groups(
    client_ids: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Disjoint groups of ``round(f * n)`` clients for each share ``f``, each sorted.

    One seeded order of the sorted ids is dealt out group after group, so the first group is
    exactly what :func:`choose_malicious` draws for its share alone, and a group never depends
    on the shares after it.
    """
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise robust_base.RobustnessError(
            f"The malicious fractions must be in [0, 1], got {list(fractions)}."
        )
    ids = sorted(client_ids)
    if len(set(ids)) != len(ids):
        raise robust_base.RobustnessError("Client ids must be distinct.")
    counts = [round(f * len(ids)) for f in fractions]
    if sum(counts) > len(ids):
        raise robust_base.RobustnessError(
            f"Groups of {counts} clients do not fit in {len(ids)} clients."
        )
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    groups, start = [], 0
    for count in counts:
        groups.append(sorted(ids[i] for i in order[start : start + count]))
        start += count
    return groups
