"""A realistic round: eight clients of a logistic regression, two free riders and one with shuffled
labels, scored by exact Shapley, GTG-Shapley, leave-one-out and cosine through the server's own
aggregation (example-weighted FedAvg mean) and optimizer step (FedAvg, learning rate 1).

The setup (stated because the ranking depends on it): 10 Gaussian features, labels drawn from a
logistic model with weights ~ N(0, 1.5^2); five honest clients with 200, 120, 300, 80 and 150
examples; two free riders (clients 5 and 6) that send a zero update and claim 200 examples each;
client 7 trains on 160 examples with shuffled labels. Every client runs 10 full-batch gradient
steps (learning rate 0.5) from the global model. The utility is the negative cross-entropy on
2000 validation examples, a smooth utility: with accuracy instead, leave-one-out scores every
honest client near 0, since any four of them reach the same accuracy.

A zero update only dilutes the weighted mean (a shorter step along the honest direction, and
10 steps from the start leave the model short of the optimum), so a free rider's marginal
contribution is negative; shuffled labels carry no signal. The three rank last under exact
Shapley, GTG-Shapley, leave-one-out and cosine for each of the data seeds 0 to 11 (measured; the
test runs three): for seeds 0 to 2 the honest clients' exact Shapley values lie in 0.043 to
0.077 and the three others' in -0.041 to -0.016. With this smooth utility GTG-Shapley's
truncations rarely fire, and it spends 201 to 224 of the 256 evaluations.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedguard.algorithms.contribution import (
    cosine,
    free_riders,
    gtg,
    leave_one_out,
    rewards,
    shapley,
)
from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as cu
from fedguard.algorithms.optimizers import aggregation, server

FEATURES = 10
HONEST_SIZES = (200, 120, 300, 80, 150)
FREE_RIDERS = (5, 6)
SHUFFLED = 7
BAD = {5, 6, 7}
CLAIMED = (*HONEST_SIZES, 200, 200, 160)  # the example counts the server weights by


class Federation:
    """The clients' data, the validation set and one FedAvg round from a global model."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.w_true = 1.5 * torch.randn(FEATURES, generator=self.g, dtype=torch.float64)
        self.val = self.sample(2000)
        self.data = [self.sample(n) for n in HONEST_SIZES]
        x, y = self.sample(CLAIMED[SHUFFLED])
        self.data.append((x, y[torch.randperm(len(y), generator=self.g)]))
        self.weights = torch.tensor(CLAIMED, dtype=torch.float64)
        self.optimizer = server.ServerOptimizerConfig(server.ServerOptimizer.FEDAVG, lr=1.0)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=self.g, dtype=torch.float64)
        p = torch.sigmoid(x @ self.w_true)
        return x, (torch.rand(n, generator=self.g, dtype=torch.float64) < p).to(torch.float64)

    @staticmethod
    def loss(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = x @ params[:FEATURES] + params[FEATURES]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)

    def local_update(self, client: int, global_params: torch.Tensor) -> torch.Tensor:
        if client in FREE_RIDERS:
            return torch.zeros_like(global_params)
        x, y = self.data[client if client < SHUFFLED else len(HONEST_SIZES)]
        params = global_params.to(torch.float64).clone().requires_grad_(True)
        for _ in range(10):
            (grad,) = torch.autograd.grad(self.loss(params, x, y), params)
            params = (params - 0.5 * grad).detach().requires_grad_(True)
        return (params.detach() - global_params).to(torch.float32)

    def utility(self, global_params: torch.Tensor) -> tuple[cu.Utility, torch.Tensor]:
        updates = torch.stack([self.local_update(k, global_params) for k in range(8)])
        state = server.init(self.optimizer, global_params)

        def apply(delta: torch.Tensor) -> torch.Tensor:
            return server.apply(self.optimizer, state, global_params, delta)[1]

        def evaluate(params: torch.Tensor) -> float:
            return -float(self.loss(params.to(torch.float64), *self.val))

        u = cu.from_updates(
            updates,
            self.weights,
            aggregate=aggregation.weighted_mean,
            apply=apply,
            evaluate=evaluate,
            previous=global_params,
        )
        return u, updates


def last_three(values: tuple[float, ...] | list[float]) -> set[int]:
    return set(sorted(range(len(values)), key=lambda i: values[i])[:3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_riders_and_shuffled_labels_rank_last(seed: int) -> None:
    fed = Federation(seed)
    start = torch.zeros(FEATURES + 1)
    u, updates = fed.utility(start)
    exact = shapley.exact(u)
    assert last_three(exact.values) == BAD
    assert max(exact.values[i] for i in BAD) < 0 < min(exact.values[i] for i in range(5))
    assert exact.values[5] == pytest.approx(exact.values[6], abs=1e-12)  # identical free riders
    everyone = u(frozenset(range(8))) - u(frozenset())
    assert math.fsum(exact.values) == pytest.approx(everyone, abs=1e-9)

    fresh, _ = fed.utility(start)
    estimate = gtg.shapley(
        fresh, generator=torch.Generator().manual_seed(seed), config=gtg.GtgConfig()
    )
    assert last_three(estimate.values) == BAD
    assert estimate.evaluations < 256

    loo = leave_one_out.leave_one_out(u)
    assert last_three(loo.values) == BAD
    assert loo.evaluations == 0  # exact Shapley already evaluated every coalition

    cos = cosine.cosine_to_aggregate(updates, aggregation.weighted_mean(updates, fed.weights))
    assert last_three(cos.tolist()) == BAD
    assert cos[5] == cos[6] == 0.0
    assert float(cos[:5].min()) > 0.8  # honest updates point the aggregate's way


def test_three_rounds_of_scores_flag_and_pay_the_honest_clients() -> None:
    """Three FedAvg rounds scored by GTG-Shapley: the ledger's cumulative scores, the free-rider
    flags (below 0 for 3 scored rounds) and a reward of 1000 with a 10% floor."""
    fed = Federation(3)
    params = torch.zeros(FEATURES + 1)
    ledger = contribution_ledger.empty()
    flags = free_riders.empty()
    rule = free_riders.FlagConfig(threshold=0.0, patience=3)
    for round_ in (1, 2, 3):
        u, updates = fed.utility(params)
        scores = gtg.shapley(
            u, generator=torch.Generator().manual_seed(round_), config=gtg.GtgConfig()
        )
        by_client = dict(enumerate(scores.values))
        ledger = contribution_ledger.record(ledger, round_, by_client)
        flags = free_riders.update(rule, flags, round_, by_client)
        assert free_riders.flagged(rule, flags) == (BAD if round_ == 3 else frozenset())
        delta = aggregation.weighted_mean(updates, fed.weights)
        params = server.apply(fed.optimizer, server.init(fed.optimizer, params), params, delta)[1]
    assert last_three(list(ledger.cumulative.values())) == BAD
    pay = rewards.split(ledger.cumulative, 1000.0, floor=0.1)
    assert math.fsum(pay.values()) == pytest.approx(1000.0, rel=1e-12)
    for client in BAD:
        assert pay[client] == pytest.approx(100.0 / 8, rel=1e-12)  # the floor share only
    assert min(pay[c] for c in range(5)) > 100.0 / 8
