"""Edges of the SecAgg+ graph's degree and checks (found by mutation testing)."""

from __future__ import annotations

import pytest

from fedguard.algorithms.secagg import graph as sg


def test_tolerant_degree_refuses_a_certain_dropout() -> None:
    for rate in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="dropout rate"):
            sg.tolerant_degree(10, rate)
    assert sg.tolerant_degree(10, 0.0) == sg.default_degree(10) == 4


def test_tolerant_degree_stops_when_the_target_is_met_exactly() -> None:
    # no dropout: every neighbourhood survives, failure 0 <= target 0
    assert sg.tolerant_degree(64, 0.0, failure_target=0.0) == 6
    assert sg.neighbourhood_failure(6, 0.0) == 0.0


def test_check_symmetric_names_a_one_way_edge_to_an_unknown_client() -> None:
    with pytest.raises(ValueError, match="one direction"):
        sg.check_symmetric({1: frozenset({2})})
    with pytest.raises(ValueError, match="one direction"):
        sg.check_symmetric({1: frozenset({2}), 2: frozenset()})
    with pytest.raises(ValueError, match="own neighbour"):
        sg.check_symmetric({1: frozenset({1})})
    sg.check_symmetric({1: frozenset({2}), 2: frozenset({1})})


def test_feasible_degree_by_hand() -> None:
    # (n, k) -> k capped at n - 1, and raised by one when k and n are both odd
    cases = {
        (2, 1): 1,
        (2, 5): 1,
        (4, 1): 1,
        (4, 10): 3,
        (5, 1): 2,
        (5, 3): 4,
        (5, 4): 4,
        (6, 3): 3,
    }
    assert {nk: sg.feasible_degree(*nk) for nk in cases} == cases
    with pytest.raises(ValueError, match="at least 2 clients"):
        sg.feasible_degree(1, 1)
    with pytest.raises(ValueError, match="neighbours must be positive"):
        sg.feasible_degree(4, 0)
