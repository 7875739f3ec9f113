"""GTG-Shapley against exact Shapley values, and each of its savings counted.

The games: ``v(S) = 0.1 + 0.8 * (1 - (1 - t)^2)`` with ``t = min(1, sum of w_i over S / T)``, the
weights ``w_i`` log-normal (sigma 0.75) and ``T`` 40% of their sum: concave like an accuracy
curve, and flat once a coalition holds 40% of the weight, as accuracy is once a few clients'
updates are averaged. Measured over 20 such games of 8 players and 5 seeds each, with
``convergence_tolerance = 0.01``: Pearson >= 0.961, Spearman >= 0.905, at most 200 of the 256
evaluations of exact Shapley (165 on average); at 12 players, at most 959 of 4096.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedguard.algorithms.contribution import gtg, shapley
from fedguard.algorithms.contribution import utility as cu

ACCURATE = gtg.GtgConfig(convergence_tolerance=0.01)


def saturating_game(seed: int, k: int) -> cu.UtilityFn:
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 0.75, k)
    plateau = 0.4 * float(w.sum())

    def v(s: frozenset[int]) -> float:
        t = min(math.fsum(w[i] for i in s) / plateau, 1.0)
        return 0.1 + 0.8 * (1.0 - (1.0 - t) ** 2)

    return v


def pearson(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


def spearman(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x))).astype(float) for x in (a, b)]
    return pearson(list(ranks[0]), list(ranks[1]))


def run(v: cu.UtilityFn, k: int, seed: int, config: gtg.GtgConfig) -> gtg.GtgScores:
    return gtg.shapley(
        cu.Utility(v, k), generator=torch.Generator().manual_seed(seed), config=config
    )


@pytest.mark.parametrize("game", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gtg_tracks_exact_shapley_with_fewer_evaluations_at_8_players(game: int, seed: int) -> None:
    v = saturating_game(game, 8)
    exact = shapley.exact(cu.Utility(v, 8))
    estimate = run(v, 8, seed, ACCURATE)
    assert pearson(exact.values, estimate.values) >= 0.95
    assert spearman(exact.values, estimate.values) >= 0.9
    assert estimate.evaluations <= 0.8 * exact.evaluations  # at most 205 of 256
    assert estimate.permutations % 8 == 0 and estimate.permutations >= 3 * 8  # whole cycles


@pytest.mark.parametrize("seed", [0, 1])
def test_gtg_at_12_players_needs_under_a_third_of_exacts_evaluations(seed: int) -> None:
    v = saturating_game(7, 12)
    exact = shapley.exact(cu.Utility(v, 12))
    estimate = run(v, 12, seed, ACCURATE)
    assert pearson(exact.values, estimate.values) >= 0.95
    assert spearman(exact.values, estimate.values) >= 0.9
    assert estimate.evaluations <= 0.3 * exact.evaluations  # at most 1229 of 4096


def test_within_round_truncation_saves_evaluations_on_the_same_permutations() -> None:
    # 5 cycles exactly, with and without truncation: the same seed walks the same 40 orders.
    # Past the plateau every marginal contribution is exactly 0, so truncating there changes no
    # estimate, and only saves the evaluations of coalitions beyond it.
    v = saturating_game(3, 8)
    fixed = gtg.GtgConfig(min_cycles=5, max_cycles=5, walk_tolerance=0.0)
    full = run(v, 8, 4, fixed)
    truncated = run(v, 8, 4, gtg.GtgConfig(min_cycles=5, max_cycles=5, walk_tolerance=1e-9))
    assert full.permutations == truncated.permutations == 40
    assert truncated.values == pytest.approx(full.values, abs=1e-12)
    assert truncated.evaluations <= 0.75 * full.evaluations
    # A coarser tolerance saves more and moves the estimates by little.
    coarse = run(v, 8, 4, gtg.GtgConfig(min_cycles=5, max_cycles=5, walk_tolerance=0.02))
    assert coarse.evaluations < truncated.evaluations
    assert pearson(coarse.values, full.values) >= 0.99


def test_between_round_truncation_skips_a_round_that_barely_moved() -> None:
    calls: list[frozenset[int]] = []

    def v(s: frozenset[int]) -> float:
        calls.append(s)
        return 0.71 + 0.0004 * len(s) / 6  # the whole round gains 0.0004 < 1e-3

    scores = run(v, 6, 0, gtg.GtgConfig(round_tolerance=1e-3))
    assert scores.skipped and scores.converged
    assert scores.values == (0.0,) * 6
    assert (scores.evaluations, scores.permutations) == (2, 0)
    assert set(calls) == {frozenset(), frozenset(range(6))}
    walked = run(v, 6, 0, gtg.GtgConfig(round_tolerance=1e-4, walk_tolerance=0.0))
    assert not walked.skipped and walked.permutations >= 18
    assert math.fsum(walked.values) == pytest.approx(0.0004, abs=1e-12)


def test_gtg_is_deterministic_given_the_seed() -> None:
    v = saturating_game(4, 8)
    first, again = run(v, 8, 11, gtg.GtgConfig()), run(v, 8, 11, gtg.GtgConfig())
    assert dataclasses.replace(first, seconds=0.0) == dataclasses.replace(again, seconds=0.0)
    other = run(v, 8, 12, gtg.GtgConfig())
    assert other.values != first.values


def test_guided_sampling_puts_every_participant_first_once_per_cycle() -> None:
    firsts: list[frozenset[int]] = []

    def v(s: frozenset[int]) -> float:
        if len(s) == 1:
            firsts.append(s)
        return 0.3 * len(s) ** 1.5

    scores = run(v, 7, 2, gtg.GtgConfig(min_cycles=1, max_cycles=1, walk_tolerance=0.0))
    assert sorted(firsts, key=min) == [frozenset({i}) for i in range(7)]
    assert scores.permutations == 7 and not scores.converged
    # Efficiency holds on every single permutation walked without truncation.
    assert math.fsum(scores.values) == pytest.approx(0.3 * 7**1.5, abs=1e-12)


def test_gtg_config_refuses_bad_settings() -> None:
    with pytest.raises(cu.ContributionError, match="walk_tolerance"):
        gtg.GtgConfig(walk_tolerance=-1e-3)
    with pytest.raises(cu.ContributionError, match="convergence_tolerance"):
        gtg.GtgConfig(convergence_tolerance=0.0)
    with pytest.raises(cu.ContributionError, match="min_cycles <= max_cycles"):
        gtg.GtgConfig(min_cycles=4, max_cycles=3)
    with pytest.raises(cu.ContributionError, match="window"):
        gtg.GtgConfig(window=0)


def _reference_budgeted(v: cu.UtilityFn, k: int, seed: int, budget: int) -> tuple[list[float], int]:
    """The budgeted estimate by hand: guided orders drawn as the algorithm draws them, walked
    without truncation; a permutation is kept while the distinct coalitions it needs (with
    v(empty) and v(N)) stay within ``budget``. Returns the mean marginals and their count."""
    gen = torch.Generator().manual_seed(seed)
    seen = {frozenset(), frozenset(range(k))}
    totals = [0.0] * k
    kept = 0
    while True:
        lead = kept % k
        rest = [p for p in range(k) if p != lead]
        order = [lead] + [rest[j] for j in torch.randperm(k - 1, generator=gen).tolist()]
        prefixes = [frozenset(order[: i + 1]) for i in range(k)]
        if len(seen | set(prefixes)) > budget:
            return [t / kept for t in totals], kept
        seen |= set(prefixes)
        for i, p in enumerate(order):
            before = v(frozenset(order[:i]))
            totals[p] += v(prefixes[i]) - before
        kept += 1


@pytest.mark.parametrize("budget", [9, 10, 17, 26, 40, 77])
def test_an_evaluation_budget_is_never_exceeded_and_keeps_whole_permutations(budget: int) -> None:
    k = 8
    v = saturating_game(5, k)
    calls: list[frozenset[int]] = []

    def counted(s: frozenset[int]) -> float:
        calls.append(s)
        return v(s)

    config = gtg.GtgConfig(walk_tolerance=0.0, max_evaluations=budget)
    scores = run(counted, k, 3, config)
    assert len(calls) == len(set(calls)) == scores.evaluations <= budget
    assert scores.budget_exhausted and not scores.converged
    expected, kept = _reference_budgeted(v, k, 3, budget)
    assert scores.permutations == kept >= 1
    assert scores.values == pytest.approx(expected, abs=1e-12)
    # Every kept permutation was walked to its end: efficiency holds exactly.
    assert math.fsum(scores.values) == pytest.approx(v(frozenset(range(k))) - v(frozenset()))


def test_a_budget_above_the_unbounded_cost_changes_nothing() -> None:
    v = saturating_game(6, 8)
    free = run(v, 8, 1, gtg.GtgConfig())
    capped = run(v, 8, 1, gtg.GtgConfig(max_evaluations=free.evaluations))
    assert not capped.budget_exhausted and capped.converged == free.converged
    assert capped.values == free.values and capped.evaluations == free.evaluations
    tighter = run(v, 8, 1, gtg.GtgConfig(max_evaluations=free.evaluations - 1))
    assert tighter.budget_exhausted and tighter.evaluations <= free.evaluations - 1
    assert tighter.permutations < free.permutations


def test_a_budget_too_small_for_one_permutation_is_refused() -> None:
    with pytest.raises(cu.ContributionError, match="max_evaluations must be at least 3"):
        gtg.GtgConfig(max_evaluations=2)
    v = saturating_game(0, 8)
    with pytest.raises(cu.ContributionError, match="cannot pay for one permutation of 8"):
        run(v, 8, 0, gtg.GtgConfig(max_evaluations=8))
    assert run(v, 8, 0, gtg.GtgConfig(max_evaluations=9)).permutations == 1
