"""Scores over rounds: the ledger, the reward split and the free-rider flags, by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedguard.algorithms.contribution import free_riders, rewards
from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as cu

# ---- the ledger -------------------------------------------------------------------------------


def three_rounds() -> contribution_ledger.Ledger:
    ledger = contribution_ledger.empty()
    ledger = contribution_ledger.record(ledger, 1, {4: 0.125, 9: -0.03, 2: 0.4})
    ledger = contribution_ledger.record(ledger, 2, {9: 0.01, 2: 0.1})
    return contribution_ledger.record(ledger, 5, {4: 0.3, 11: 0.07})


def test_the_ledger_sums_each_clients_scores_over_the_rounds_it_was_scored() -> None:
    ledger = three_rounds()
    assert dict(ledger.cumulative) == pytest.approx({4: 0.425, 9: -0.02, 2: 0.5, 11: 0.07})
    assert dict(ledger.rounds) == {4: 2, 9: 2, 2: 2, 11: 1}
    assert ledger.last_round == 5


def test_recording_returns_a_new_ledger_and_leaves_the_old_one() -> None:
    before = contribution_ledger.record(contribution_ledger.empty(), 0, {1: 0.5})
    after = contribution_ledger.record(before, 1, {1: 0.25})
    assert dict(before.cumulative) == {1: 0.5} and dict(after.cumulative) == {1: 0.75}
    with pytest.raises(TypeError):
        after.cumulative[1] = 0.0  # type: ignore[index]


def test_the_ledger_refuses_a_round_twice_or_out_of_order_and_bad_scores() -> None:
    ledger = three_rounds()
    for round_ in (5, 3):
        with pytest.raises(cu.ContributionError, match="once, in increasing order"):
            contribution_ledger.record(ledger, round_, {4: 0.1})
    with pytest.raises(cu.ContributionError, match="must be finite"):
        contribution_ledger.record(ledger, 6, {4: math.inf})
    with pytest.raises(cu.ContributionError, match="client id"):
        contribution_ledger.record(ledger, 6, {-1: 0.1})


def test_the_ledger_survives_a_json_round_trip_exactly() -> None:
    ledger = contribution_ledger.record(three_rounds(), 6, {4: 0.1 + 0.2, 7: 1 / 3})
    text = json.dumps(contribution_ledger.to_json(ledger))
    restored = contribution_ledger.from_json(json.loads(text))
    assert restored == ledger
    assert restored.cumulative[7] == 1 / 3  # the exact float, not a rounded one
    empty = contribution_ledger.from_json(
        json.loads(json.dumps(contribution_ledger.to_json(contribution_ledger.empty())))
    )
    assert empty == contribution_ledger.empty()


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"last_round": 1},
        {"last_round": -1, "clients": []},
        {"last_round": 1, "clients": [{"client": 1, "cumulative": "0.5", "rounds": 1}]},
        {"last_round": 1, "clients": [{"client": 1, "cumulative": 0.5, "rounds": 0}]},
        {"last_round": 1, "clients": [{"client": 1, "cumulative": 0.5, "rounds": 1}] * 2},
        {"last_round": 1, "clients": [{"client": True, "cumulative": 0.5, "rounds": 1}]},
    ],
)
def test_the_ledger_refuses_json_of_any_other_form(data: object) -> None:
    with pytest.raises(cu.ContributionError):
        contribution_ledger.from_json(data)


# ---- the reward split -------------------------------------------------------------------------


def test_a_proportional_split_pays_nothing_for_negative_or_zero_scores() -> None:
    pay = rewards.split({1: 3.0, 2: 1.0, 3: -2.0, 4: 0.0}, 100.0, floor=0.0)
    assert pay == pytest.approx({1: 75.0, 2: 25.0, 3: 0.0, 4: 0.0})


def test_the_floor_is_a_fraction_of_the_total_shared_equally() -> None:
    # floor 0.2 of 100: 5 to each of the 4; the other 80 split 3:1 between clients 1 and 2.
    pay = rewards.split({1: 3.0, 2: 1.0, 3: -2.0, 4: 0.0}, 100.0, floor=0.2)
    assert pay == pytest.approx({1: 65.0, 2: 25.0, 3: 5.0, 4: 5.0})
    assert rewards.split({1: 3.0, 2: 1.0}, 60.0, floor=1.0) == pytest.approx({1: 30.0, 2: 30.0})


def test_without_a_positive_score_everyone_gets_an_equal_share() -> None:
    pay = rewards.split({1: -0.5, 2: 0.0, 3: -0.01}, 90.0, floor=0.3)
    assert pay == pytest.approx({1: 30.0, 2: 30.0, 3: 30.0})


@pytest.mark.parametrize("floor", [0.0, 0.15, 0.6])
def test_shares_sum_to_the_total_and_respect_the_floor(floor: float) -> None:
    rng = np.random.default_rng(3)
    scores = dict(enumerate(rng.normal(0.02, 0.05, 23).tolist()))
    total = 1234.5
    pay = rewards.split(scores, total, floor=floor)
    assert math.fsum(pay.values()) == pytest.approx(total, rel=1e-12)
    assert min(pay.values()) >= floor * total / 23 * (1 - 1e-12)
    positive = {c for c, s in scores.items() if s > 0}
    assert {c for c, p in pay.items() if p > floor * total / 23 * (1 + 1e-12)} == positive
    best = max(scores, key=lambda c: scores[c])
    assert pay[best] == max(pay.values())


@pytest.mark.parametrize(
    ("scores", "total", "floor", "message"),
    [
        ({}, 10.0, 0.1, "no participants"),
        ({1: 1.0}, -1.0, 0.1, "finite and >= 0"),
        ({1: 1.0}, 10.0, 1.5, r"in \[0, 1\]"),
        ({1: math.nan}, 10.0, 0.1, "must be finite"),
    ],
)
def test_the_split_refuses_bad_arguments(
    scores: dict[int, float], total: float, floor: float, message: str
) -> None:
    with pytest.raises(cu.ContributionError, match=message):
        rewards.split(scores, total, floor=floor)


# ---- free-rider flags -------------------------------------------------------------------------


def test_a_client_is_flagged_after_patience_scored_rounds_below_the_threshold_and_not_before() -> (
    None
):
    rule = free_riders.FlagConfig(threshold=0.01, patience=3)
    state = free_riders.empty()
    rounds = [
        (1, {7: 0.0, 8: 0.2}),
        (2, {7: -0.02, 8: 0.005}),  # 8 dips once
        (3, {8: 0.3}),  # 7 sits out: its streak neither grows nor breaks
        (4, {7: 0.009, 8: 0.004}),
    ]
    seen = []
    for round_, scores in rounds:
        state = free_riders.update(rule, state, round_, scores)
        seen.append(free_riders.flagged(rule, state))
    assert seen == [frozenset(), frozenset(), frozenset(), frozenset({7})]
    assert dict(state.streaks) == {7: 3, 8: 1}
    state = free_riders.update(rule, state, 5, {7: 0.01})  # at the threshold: not below
    assert free_riders.flagged(rule, state) == frozenset()


def test_the_cumulative_signal_flags_a_client_whose_total_stays_below() -> None:
    rule = free_riders.FlagConfig(threshold=0.0, patience=2, signal=free_riders.Signal.CUMULATIVE)
    ledger = contribution_ledger.empty()
    state = free_riders.empty()
    flagged = []
    for round_, scores in enumerate([{3: 0.05}, {3: -0.03}, {3: -0.04}, {3: -0.01}], start=1):
        ledger = contribution_ledger.record(ledger, round_, scores)
        state = free_riders.update(rule, state, round_, scores, ledger.cumulative)
        flagged.append(3 in free_riders.flagged(rule, state))
    # cumulative 0.05, 0.02, -0.02, -0.03: below 0 from round 3, flagged at round 4
    assert flagged == [False, False, False, True]
    with pytest.raises(cu.ContributionError, match="needs the cumulative"):
        free_riders.update(rule, state, 5, {3: 0.0})


def test_flag_state_json_round_trip_and_refusals() -> None:
    rule = free_riders.FlagConfig(threshold=0.0, patience=2)
    state = free_riders.update(rule, free_riders.empty(), 4, {1: -0.1, 6: 0.2})
    restored = free_riders.from_json(json.loads(json.dumps(free_riders.to_json(state))))
    assert restored == state and restored.last_round == 4
    with pytest.raises(cu.ContributionError, match="once, in increasing order"):
        free_riders.update(rule, restored, 4, {1: -0.1})
    with pytest.raises(cu.ContributionError):
        free_riders.from_json({"last_round": 4, "streaks": [{"client": 1, "streak": -1}]})
    with pytest.raises(cu.ContributionError, match="patience"):
        free_riders.FlagConfig(threshold=0.0, patience=0)
    with pytest.raises(cu.ContributionError, match="threshold"):
        free_riders.FlagConfig(threshold=math.nan, patience=2)
