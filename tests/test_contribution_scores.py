"""Contribution scores against references written here: closed forms of classic games, a brute-force
average over every joining order, and hand-computed leave-one-out and cosine values.

The games keep their constants away from 1 and give ``v(empty)`` an offset, so that a missing
factor or a forgotten baseline shows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedguard.algorithms.contribution import cosine, leave_one_out, shapley
from fedguard.algorithms.contribution import utility as cu
from fedguard.algorithms.optimizers import aggregation

Game = Callable[[frozenset[int]], float]


def by_permutations(v: Game, k: int) -> list[float]:
    """The Shapley value as the mean marginal contribution over all k! joining orders."""
    totals = [0.0] * k
    orders = list(itertools.permutations(range(k)))
    for order in orders:
        before: frozenset[int] = frozenset()
        for p in order:
            after = before | {p}
            totals[p] += v(after) - v(before)
            before = after
    return [t / len(orders) for t in totals]


def table_game(seed: int) -> Game:
    """A random game on 6 players where 0 and 1 are interchangeable and 5 is a null player."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(-2.0, 3.0, size=(3, 8))  # (how many of {0, 1}, which of {2, 3, 4})

    def v(s: frozenset[int]) -> float:
        pair = len(s & {0, 1})
        rest = sum(1 << (i - 2) for i in s & {2, 3, 4})
        return float(values[pair, rest])

    return v


# ---- the utility: memo, counting, validation --------------------------------------------------


def test_the_utility_evaluates_each_coalition_once_and_counts_time() -> None:
    calls: list[frozenset[int]] = []
    ticks = iter([10.0, 10.25, 20.0, 20.5])

    def v(s: frozenset[int]) -> float:
        calls.append(s)
        return 0.3 * len(s)

    u = cu.Utility(v, 4, clock=lambda: next(ticks))
    assert u(frozenset({1, 2})) == pytest.approx(0.6)
    assert u(frozenset({2, 1})) == pytest.approx(0.6)
    assert u(frozenset()) == 0.0
    assert calls == [frozenset({1, 2}), frozenset()]
    assert u.cost() == cu.Cost(2, 0.75)
    assert u.cost().since(cu.Cost(1, 0.25)) == cu.Cost(1, 0.5)


def test_the_utility_refuses_outsiders_non_finite_values_and_no_players() -> None:
    u = cu.Utility(lambda s: 1.5, 3)
    with pytest.raises(cu.ContributionError, match=r"outside 0\.\.2"):
        u(frozenset({3}))
    with pytest.raises(cu.ContributionError, match="must be finite"):
        cu.Utility(lambda s: math.nan, 3)(frozenset({0}))
    with pytest.raises(cu.ContributionError, match="at least one participant"):
        cu.Utility(lambda s: 0.0, 0)


def test_from_updates_rebuilds_each_sub_model_with_the_servers_rule() -> None:
    updates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    weights = torch.tensor([1.0, 2.0, 3.0])
    previous = torch.tensor([0.5, -0.5])
    target = torch.tensor([2.0, 1.0])
    seen: list[torch.Tensor] = []

    def apply(delta: torch.Tensor) -> torch.Tensor:
        seen.append(delta)
        return previous + 0.5 * delta  # a server learning rate of 0.5

    def evaluate(params: torch.Tensor) -> float:
        return -float(((params - target) ** 2).sum())

    u = cu.from_updates(
        updates,
        weights,
        aggregate=aggregation.weighted_mean,
        apply=apply,
        evaluate=evaluate,
        previous=previous,
    )
    # {0, 2}: (1 * [1, 0] + 3 * [3, 3]) / 4 = [2.5, 2.25]; params [1.75, 0.625];
    # -(0.25^2 + 0.375^2) = -0.203125
    assert u(frozenset({2, 0})) == pytest.approx(-0.203125)
    assert torch.allclose(seen[-1], torch.tensor([2.5, 2.25]))
    assert u(frozenset()) == pytest.approx(-(1.5**2 + 1.5**2))  # the previous model
    assert u.players == 3
    with pytest.raises(cu.ContributionError, match="one per update"):
        cu.from_updates(
            updates,
            weights[:2],
            aggregate=aggregation.weighted_mean,
            apply=apply,
            evaluate=evaluate,
            previous=previous,
        )


# ---- exact Shapley ----------------------------------------------------------------------------


def test_exact_shapley_of_an_additive_game_is_each_players_weight() -> None:
    w = [0.7, -0.3, 1.9, 0.05, 2.6]
    scores = shapley.exact(cu.Utility(lambda s: 0.25 + sum(w[i] for i in s), 5))
    assert scores.values == pytest.approx(w, abs=1e-12)
    assert scores.evaluations == 32


def test_exact_shapley_of_the_apex_game() -> None:
    # Apex game on 5 players, worth 7: a coalition wins with the apex (0) and one minor player,
    # or with all four minors. Closed form: apex (n - 2) / n, each minor 2 / (n (n - 1)).
    def v(s: frozenset[int]) -> float:
        wins = (0 in s and len(s) >= 2) or s >= {1, 2, 3, 4}
        return 0.4 + 7.0 * wins

    scores = shapley.exact(cu.Utility(v, 5))
    assert scores.values == pytest.approx([7.0 * 3 / 5] + [7.0 * 2 / 20] * 4, abs=1e-12)


def test_exact_shapley_of_the_glove_game() -> None:
    # One left glove (player 0), two right gloves (1, 2), a pair worth 3: (2, 0.5, 0.5).
    def v(s: frozenset[int]) -> float:
        return 3.0 * min(len(s & {0}), len(s & {1, 2}))

    assert shapley.exact(cu.Utility(v, 3)).values == pytest.approx([2.0, 0.5, 0.5], abs=1e-12)


def test_exact_shapley_of_a_symmetric_and_a_unanimity_game() -> None:
    symmetric = shapley.exact(cu.Utility(lambda s: 0.1 + 0.3 * len(s) ** 2, 6))
    assert symmetric.values == pytest.approx([0.3 * 36 / 6] * 6, abs=1e-12)
    # Unanimity game of T = {1, 3, 4} worth 5: 5/3 each for T, 0 for the others.
    unanimity = shapley.exact(cu.Utility(lambda s: 5.0 * (s >= {1, 3, 4}), 6))
    assert unanimity.values == pytest.approx([0, 5 / 3, 0, 5 / 3, 5 / 3, 0], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_shapley_axioms_and_the_order_average_on_a_random_game(seed: int) -> None:
    v = table_game(seed)
    phi = shapley.exact(cu.Utility(v, 6)).values
    assert phi == pytest.approx(by_permutations(v, 6), abs=1e-12)
    assert math.fsum(phi) == pytest.approx(v(frozenset(range(6))) - v(frozenset()), abs=1e-12)
    assert phi[0] == pytest.approx(phi[1], abs=1e-12)  # symmetry
    assert phi[5] == pytest.approx(0.0, abs=1e-12)  # null player
    assert abs(phi[0]) > 1e-3 and abs(phi[2] - phi[3]) > 1e-3  # not trivially so


def test_exact_shapley_refuses_more_than_12_participants_before_evaluating() -> None:
    calls: list[frozenset[int]] = []

    def v(s: frozenset[int]) -> float:
        calls.append(s)
        return 0.0

    u = cu.Utility(v, 13)
    with pytest.raises(cu.ContributionError, match=r"K=13 .* limit of 12 .*GTG-Shapley"):
        shapley.exact(u)
    assert calls == []
    assert shapley.exact(cu.Utility(lambda s: 0.5 * len(s), 12)).evaluations == 4096


# ---- leave-one-out ----------------------------------------------------------------------------

THREE = {
    (): 0.1,
    (0,): 0.4,
    (1,): 0.3,
    (2,): 0.2,
    (0, 1): 0.6,
    (0, 2): 0.5,
    (1, 2): 0.45,
    (0, 1, 2): 0.8,
}


def three(s: frozenset[int]) -> float:
    return THREE[tuple(sorted(s))]


def test_leave_one_out_by_hand() -> None:
    scores = leave_one_out.leave_one_out(cu.Utility(three, 3))
    assert scores.values == pytest.approx([0.8 - 0.45, 0.8 - 0.5, 0.8 - 0.6], abs=1e-12)
    assert scores.evaluations == 4
    single = leave_one_out.leave_one_out(cu.Utility(lambda s: 0.2 + 0.35 * len(s), 1))
    assert single.values == pytest.approx([0.35], abs=1e-12)


def test_exact_shapley_of_the_three_player_table_by_hand() -> None:
    # phi_0 = 1/3 (0.4 - 0.1) + 1/6 (0.6 - 0.3) + 1/6 (0.5 - 0.2) + 1/3 (0.8 - 0.45)
    expected = [
        0.3 / 3 + 0.3 / 6 + 0.3 / 6 + 0.35 / 3,
        0.2 / 3 + 0.2 / 6 + 0.25 / 6 + 0.3 / 3,
        0.1 / 3 + 0.1 / 6 + 0.15 / 6 + 0.2 / 3,
    ]
    assert shapley.exact(cu.Utility(three, 3)).values == pytest.approx(expected, abs=1e-12)


def test_scores_on_one_utility_share_its_evaluations() -> None:
    u = cu.Utility(three, 3)
    assert shapley.exact(u).evaluations == 8
    assert leave_one_out.leave_one_out(u).evaluations == 0  # every coalition already known


# ---- cosine to the aggregate ------------------------------------------------------------------


def test_cosine_to_the_aggregate_by_hand() -> None:
    updates = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-6.0, -8.0, 0.0], [1.0, 2.0, 2.0]])
    aggregate = torch.tensor([3.0, 4.0, 0.0])
    # [1, 2, 2] . [3, 4, 0] = 11; norms 3 and 5
    expected = torch.tensor([1.0, 0.0, -1.0, 11.0 / 15.0], dtype=torch.float64)
    assert torch.allclose(cosine.cosine_to_aggregate(updates, aggregate), expected, atol=1e-12)
    zero = cosine.cosine_to_aggregate(updates, torch.zeros(3))
    assert torch.equal(zero, torch.zeros(4, dtype=torch.float64))


def test_cosine_over_several_column_blocks_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(5)
    updates = torch.randn(3, 2 * cosine.CHUNK + 17, generator=g)
    aggregate = updates.mean(dim=0) + 0.3 * torch.randn(updates.shape[1], generator=g)
    u, a = updates.to(torch.float64), aggregate.to(torch.float64)
    expected = (u @ a) / (u.norm(dim=1) * a.norm())
    assert torch.allclose(cosine.cosine_to_aggregate(updates, aggregate), expected, atol=1e-12)


def test_cosine_refuses_mismatched_shapes_and_non_finite_values() -> None:
    with pytest.raises(cu.ContributionError, match="expected"):
        cosine.cosine_to_aggregate(torch.ones(2, 3), torch.ones(4))
    with pytest.raises(cu.ContributionError, match="NaN"):
        cosine.cosine_to_aggregate(torch.tensor([[1.0, math.inf]]), torch.ones(2))
