"""Server optimizers: the state's dtype and what FedAvgM keeps, and the edges of beta1 and beta2
(found by mutation testing)."""

from __future__ import annotations

import pytest
import torch

from fedguard.algorithms.optimizers import server as so


def test_moments_are_float32_whatever_the_parameters_dtype() -> None:
    params = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    for kind in so.ServerOptimizer:
        state = so.init(so.ServerOptimizerConfig(kind=kind, tau=0.25), params)
        assert state.m.dtype == state.v.dtype == torch.float32, kind
    adam = so.init(so.ServerOptimizerConfig(kind=so.ServerOptimizer.FEDADAM, tau=0.25), params)
    assert adam.m.tolist() == [0.0, 0.0, 0.0] and adam.v.tolist() == [0.0625] * 3
    avgm = so.init(so.ServerOptimizerConfig(kind=so.ServerOptimizer.FEDAVGM), params)
    assert avgm.m.shape == (3,) and avgm.v.shape == (0,)


def test_fedavgm_keeps_its_empty_second_moment() -> None:
    config = so.ServerOptimizerConfig(kind=so.ServerOptimizer.FEDAVGM, momentum=0.5, lr=0.25)
    params = torch.tensor([1.0, 2.0])
    state = so.init(config, params)
    new_state, new_params = so.apply(config, state, params, torch.tensor([2.0, -4.0]))
    assert new_state.v is state.v and new_state.v.shape == (0,)
    assert new_state.m.tolist() == [2.0, -4.0] and new_params.tolist() == [1.5, 1.0]


@pytest.mark.parametrize("kwargs", [{"beta1": 0.0}, {"beta2": 0.0}, {"beta1": 0.0, "beta2": 0.0}])
def test_betas_of_zero_are_allowed(kwargs) -> None:
    config = so.ServerOptimizerConfig(kind=so.ServerOptimizer.FEDADAM, **kwargs)
    assert (config.beta1, config.beta2) == (kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.99))


@pytest.mark.parametrize("beta2", [1.0, 1.5, 2.0])
def test_beta2_of_one_or_more_is_refused(beta2: float) -> None:
    with pytest.raises(ValueError, match=r"beta1 and beta2 must be in \[0, 1\)"):
        so.ServerOptimizerConfig(beta2=beta2)
