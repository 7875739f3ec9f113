"""FedAvg's aggregate: the exact example-weighted mean, checked on numbers small enough by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedguard.algorithms.optimizers import aggregation

UPDATES = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # (1*1 + 1*3 + 2*5) / 4 = 14/4, (1*2 + 1*4 + 2*6) / 4 = 18/4
        ([1.0, 1.0, 2.0], [3.5, 4.5]),
        # equal weights: the plain mean
        ([1.0, 1.0, 1.0], [3.0, 4.0]),
        # only the scale-free ratio matters: 10:10:20 is 1:1:2
        ([10.0, 10.0, 20.0], [3.5, 4.5]),
        # a zero weight drops the row: (3 + 5) / 2, (4 + 6) / 2
        ([0.0, 1.0, 1.0], [4.0, 5.0]),
        # one client with all the weight
        ([0.0, 0.0, 7.0], [5.0, 6.0]),
        # example counts as FedAvg uses them: (30*1 + 10*3 + 60*5) / 100 = 3.6
        ([30.0, 10.0, 60.0], [3.6, 4.6]),
    ],
)
def test_weighted_mean_by_hand(weights: list[float], expected: list[float]) -> None:
    out = aggregation.weighted_mean(UPDATES, torch.tensor(weights))
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_single_client_returns_its_update() -> None:
    update = torch.tensor([[0.25, -1.5, 3.0]])
    out = aggregation.weighted_mean(update, torch.tensor([17.0]))
    assert torch.equal(out, update[0])


def test_integer_weights_are_accepted() -> None:
    out = aggregation.weighted_mean(UPDATES, torch.tensor([1, 1, 2]))
    assert out.tolist() == [3.5, 4.5]


def test_inputs_are_not_modified() -> None:
    updates, weights = UPDATES.clone(), torch.tensor([1.0, 1.0, 2.0])
    aggregation.weighted_mean(updates, weights)
    assert torch.equal(updates, UPDATES)
    assert weights.tolist() == [1.0, 1.0, 2.0]


def test_permutation_invariance_by_hand() -> None:
    weights = torch.tensor([1.0, 1.0, 2.0])
    for order in itertools.permutations(range(3)):
        idx = torch.tensor(order)
        assert aggregation.weighted_mean(UPDATES[idx], weights[idx]).tolist() == [3.5, 4.5]


def test_permutation_invariance_random() -> None:
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(17, 50, generator=g)
    weights = torch.randint(1, 500, (17,), generator=g).to(torch.float32)
    reference = aggregation.weighted_mean(updates, weights)
    expected = (weights.double() @ updates.double()) / weights.double().sum()
    torch.testing.assert_close(reference, expected.float(), rtol=0, atol=1e-6)
    for seed in range(5):
        perm = torch.randperm(17, generator=torch.Generator().manual_seed(seed))
        out = aggregation.weighted_mean(updates[perm], weights[perm])
        # Summed in float64, so the order only shows below float32 resolution.
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_empty_cohort_is_refused() -> None:
    with pytest.raises(ValueError, match="empty cohort"):
        aggregation.weighted_mean(torch.zeros(0, 2), torch.zeros(0))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -1.0, 2.0], "non-negative"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ([1.0, 1.0], "Expected 3 weights"),
        ([[1.0, 1.0, 2.0]], "Expected 3 weights"),
    ],
)
def test_bad_weights_are_refused(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregation.weighted_mean(UPDATES, torch.tensor(weights))


def test_updates_must_be_a_matrix() -> None:
    with pytest.raises(ValueError, match=r"\[K, D\] matrix"):
        aggregation.weighted_mean(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))


def test_a_list_of_vectors_gives_the_matrix_result() -> None:
    weights = torch.tensor([1.0, 1.0, 2.0])
    rows = list(UPDATES)
    assert aggregation.weighted_mean(rows, weights).tolist() == [3.5, 4.5]
    with pytest.raises(ValueError, match=r"Update 1 has shape \(3,\), expected \(2,\)"):
        aggregation.weighted_mean([UPDATES[0], torch.zeros(3), UPDATES[2]], weights)
    with pytest.raises(ValueError, match="empty cohort"):
        aggregation.weighted_mean([], torch.zeros(0))
