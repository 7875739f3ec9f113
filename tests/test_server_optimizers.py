"""Server optimizers and FedProx against numbers computed by hand.

Conventions of :mod:`fedguard.algorithms.optimizers.server`: ``delta`` is the aggregated
``local - global``, ``m`` starts at 0, ``v`` at ``tau^2``, no bias correction, and the adaptive
step is ``x + lr * m / (sqrt(v) + tau)``. The hyperparameters below are chosen so that every
square root is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedguard.algorithms.optimizers import aggregation
from fedguard.algorithms.optimizers import server as so
from fedguard.client import training
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.models.adapter import TorchModel
from fedguard.protocol import fedopt, messages
from fedguard.protocol.aggregator import Mean
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.strategy import StrategyKind
from fedguard.simulation.inprocess import InProcessTransport

X0 = torch.tensor([1.0, -1.0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: intra-op threads only contend on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(kind: so.ServerOptimizer, **kwargs: float) -> so.ServerOptimizerConfig:
    return so.ServerOptimizerConfig(kind=kind, **kwargs)


def _steps(
    config: so.ServerOptimizerConfig, params: torch.Tensor, deltas: list[list[float]]
) -> tuple[list[list[float]], so.ServerOptimizerState]:
    state = so.init(config, params)
    trajectory = []
    for delta in deltas:
        state, params = so.apply(config, state, params, torch.tensor(delta))
        trajectory.append(params.tolist())
    return trajectory, state


# --------------------------------------------------------------------------------------- state


def test_initial_state() -> None:
    params = torch.zeros(3)
    fedavg = so.init(_config(so.ServerOptimizer.FEDAVG), params)
    assert fedavg.m.numel() == 0 and fedavg.v.numel() == 0
    fedavgm = so.init(_config(so.ServerOptimizer.FEDAVGM), params)
    assert fedavgm.m.tolist() == [0.0, 0.0, 0.0] and fedavgm.v.numel() == 0
    for kind in (
        so.ServerOptimizer.FEDADAM,
        so.ServerOptimizer.FEDYOGI,
        so.ServerOptimizer.FEDADAGRAD,
    ):
        state = so.init(_config(kind, tau=0.5), params)
        assert state.m.tolist() == [0.0, 0.0, 0.0]
        assert state.v.tolist() == [0.25, 0.25, 0.25]  # tau^2


# -------------------------------------------------------------------------------------- FedAvg


def test_fedavg_by_hand() -> None:
    trajectory, _ = _steps(_config(so.ServerOptimizer.FEDAVG), X0, [[0.5, 2.0], [-1.0, 0.25]])
    assert trajectory == [[1.5, 1.0], [0.5, 1.25]]
    # server_lr scales the step: 1 + 0.5 * 0.5, -1 + 0.5 * 2
    trajectory, _ = _steps(_config(so.ServerOptimizer.FEDAVG, lr=0.5), X0, [[0.5, 2.0]])
    assert trajectory == [[1.25, 0.0]]


def test_fedavgm_by_hand() -> None:
    # m1 = 1, x1 = 0 + 1;  m2 = 0.9 * 1 + 1 = 1.9, x2 = 1 + 1.9;  m3 = 0.9 * 1.9 - 1 = 0.71
    config = _config(so.ServerOptimizer.FEDAVGM, momentum=0.9)
    trajectory, state = _steps(config, torch.zeros(1), [[1.0], [1.0], [-1.0]])
    assert [t[0] for t in trajectory] == pytest.approx([1.0, 2.9, 3.61], abs=1e-6)
    assert state.m.tolist() == pytest.approx([0.71], abs=1e-6)


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 0.1])
def test_fedavgm_without_momentum_is_fedavg(server_lr: float) -> None:
    deltas = [[0.3, -1.7], [2.5, 0.125], [-0.75, 4.0], [1e-3, -1e3]]
    avgm, _ = _steps(_config(so.ServerOptimizer.FEDAVGM, lr=server_lr, momentum=0.0), X0, deltas)
    avg, _ = _steps(_config(so.ServerOptimizer.FEDAVG, lr=server_lr), X0, deltas)
    assert avgm == avg


def test_fedavgm_without_momentum_is_fedavg_through_strategy() -> None:
    def run(kind: StrategyKind) -> torch.Tensor:
        strategy = fedopt.create(
            kind, client_config={}, num_clients=2, server_lr=0.5, server_momentum=0.0
        )
        params, state = X0, strategy.init(X0)
        for round_, deltas in enumerate([[[1.0, 2.0], [3.0, -4.0]], [[0.5, 0.5], [-2.0, 1.0]]]):
            replies = [
                messages.FitReply(round_, cid, torch.tensor(d), num_examples=n)
                for cid, (d, n) in enumerate(zip(deltas, [3, 5], strict=True))
            ]
            state, params = strategy.aggregate(state, params, replies)
        return params

    # Example counts 3 and 5 (unequal, neither 1), so every reply's weight shows:
    # round 1: mean = (3*[1, 2] + 5*[3, -4]) / 8 = [18, -14] / 8 = [2.25, -1.75]
    # round 2: mean = (3*[0.5, 0.5] + 5*[-2, 1]) / 8 = [-8.5, 6.5] / 8 = [-1.0625, 0.8125]
    # x = [1, -1] + 0.5 * (round 1 mean) + 0.5 * (round 2 mean): all exact in binary
    expected = [1.0 + 0.5 * 2.25 + 0.5 * -1.0625, -1.0 + 0.5 * -1.75 + 0.5 * 0.8125]
    assert expected == [1.59375, -1.46875]
    assert run(StrategyKind.FEDAVG).tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(run(StrategyKind.FEDAVGM), run(StrategyKind.FEDAVG))


# ---------------------------------------------------------------------------- adaptive methods


def test_fedadam_two_steps_by_hand() -> None:
    # beta1 = beta2 = 0.5, tau = 1 (v0 = 1), lr = 1.
    # step 1, delta [1, 7]:  m = 0.5*[1, 7] = [0.5, 3.5]
    #                        v = 0.5*1 + 0.5*[1, 49] = [1, 25]
    #                        x = [1, -1] + [0.5 / (1 + 1), 3.5 / (5 + 1)] = [1.25, -5/12]
    # step 2, delta [1, -5]: m = 0.5*[0.5, 3.5] + 0.5*[1, -5] = [0.75, -0.75]
    #                        v = 0.5*[1, 25] + 0.5*[1, 25] = [1, 25]
    #                        x = [1.25, -5/12] + [0.75 / 2, -0.75 / 6] = [1.625, -13/24]
    config = _config(so.ServerOptimizer.FEDADAM, beta1=0.5, beta2=0.5, tau=1.0)
    trajectory, state = _steps(config, X0, [[1.0, 7.0], [1.0, -5.0]])
    assert trajectory[0] == pytest.approx([1.25, -5 / 12], abs=1e-6)
    assert trajectory[1] == pytest.approx([1.625, -13 / 24], abs=1e-6)
    assert state.m.tolist() == [0.75, -0.75]
    assert state.v.tolist() == [1.0, 25.0]


def test_fedadam_one_step_with_paper_defaults() -> None:
    # beta1 = 0.9, beta2 = 0.99, tau = 1e-3, lr = 0.1, delta = 1:
    # m = 0.1, v = 0.99 * 1e-6 + 0.01 = 0.01000099, x = 0.1 * 0.1 / (sqrt(v) + 1e-3)
    config = _config(so.ServerOptimizer.FEDADAM, lr=0.1)
    trajectory, state = _steps(config, torch.zeros(1), [[1.0]])
    assert state.v.tolist() == pytest.approx([0.01000099], rel=1e-6)
    assert trajectory[0][0] == pytest.approx(0.01 / (math.sqrt(0.01000099) + 1e-3), rel=1e-6)


def test_fedadagrad_two_steps_by_hand() -> None:
    # beta1 = 0.5, tau = 3 (v0 = 9), lr = 1.
    # step 1, delta [4, 0]:   m = [2, 0], v = 9 + [16, 0] = [25, 9]
    #                         x = [1, -1] + [2 / (5 + 3), 0] = [1.25, -1]
    # step 2, delta [12, -4]: m = 0.5*[2, 0] + 0.5*[12, -4] = [7, -2]
    #                         v = [25 + 144, 9 + 16] = [169, 25]
    #                         x = [1.25, -1] + [7 / (13 + 3), -2 / (5 + 3)] = [1.6875, -1.25]
    config = _config(so.ServerOptimizer.FEDADAGRAD, beta1=0.5, tau=3.0)
    trajectory, state = _steps(config, X0, [[4.0, 0.0], [12.0, -4.0]])
    assert trajectory == [[1.25, -1.0], [1.6875, -1.25]]
    assert state.m.tolist() == [7.0, -2.0]
    assert state.v.tolist() == [169.0, 25.0]


def test_fedyogi_two_steps_by_hand() -> None:
    # beta1 = 0.5, beta2 = 0.75, tau = 6.5 (v0 = 42.25), lr = 1; the three coordinates take
    # the three branches of v <- v - (1 - beta2) delta^2 sign(v - delta^2):
    # step 1, delta [5, 6.5, 84]:
    #   delta^2 = [25, 42.25, 7056];  sign(v - delta^2) = [+1, 0, -1]
    #   v = 42.25 - 0.25*[25, 0, -7056] = [36, 42.25, 1806.25] = [6^2, 6.5^2, 42.5^2]
    #   m = 0.5*delta = [2.5, 3.25, 42]
    #   x = 0 + [2.5 / (6 + 6.5), 3.25 / (6.5 + 6.5), 42 / (42.5 + 6.5)] = [0.2, 0.25, 6/7]
    # step 2, delta 0: v unchanged, m halves to [1.25, 1.625, 21]
    #   x = [0.2 + 1.25 / 12.5, 0.25 + 1.625 / 13, 6/7 + 21 / 49] = [0.3, 0.375, 9/7]
    config = _config(so.ServerOptimizer.FEDYOGI, beta1=0.5, beta2=0.75, tau=6.5)
    trajectory, state = _steps(config, torch.zeros(3), [[5.0, 6.5, 84.0], [0.0, 0.0, 0.0]])
    assert trajectory[0] == pytest.approx([0.2, 0.25, 6 / 7], abs=1e-6)
    assert trajectory[1] == pytest.approx([0.3, 0.375, 9 / 7], abs=1e-6)
    assert state.v.tolist() == [36.0, 42.25, 1806.25]
    assert state.m.tolist() == [1.25, 1.625, 21.0]


def test_yogi_and_adam_differ_only_in_v() -> None:
    # From v0 = 42.25 with delta = 5, Adam with beta2 = 0.75 gives 0.75*42.25 + 0.25*25 = 37.9375,
    # Yogi 36: Yogi shrinks v by (1 - beta2) delta^2 instead of mixing towards delta^2.
    delta = [[5.0]]
    kwargs = {"beta1": 0.5, "beta2": 0.75, "tau": 6.5}
    _, adam = _steps(_config(so.ServerOptimizer.FEDADAM, **kwargs), torch.zeros(1), delta)
    _, yogi = _steps(_config(so.ServerOptimizer.FEDYOGI, **kwargs), torch.zeros(1), delta)
    assert adam.v.tolist() == [37.9375]
    assert yogi.v.tolist() == [36.0]
    assert adam.m.tolist() == yogi.m.tolist() == [2.5]


@pytest.mark.parametrize("kind", list(so.ServerOptimizer))
def test_apply_is_pure(kind: so.ServerOptimizer) -> None:
    config = _config(kind)
    params, delta = X0.clone(), torch.tensor([0.5, -0.5])
    state = so.init(config, params)
    m, v = state.m.clone(), state.v.clone()
    so.apply(config, state, params, delta)
    assert torch.equal(params, X0) and delta.tolist() == [0.5, -0.5]
    assert torch.equal(state.m, m) and torch.equal(state.v, v)


def test_shape_mismatch_is_refused() -> None:
    config = _config(so.ServerOptimizer.FEDAVG)
    with pytest.raises(ValueError, match="aggregate has shape"):
        so.apply(config, so.init(config, X0), X0, torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "learning rate must be positive"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"beta1": 1.0}, "beta1 and beta2"),
        ({"beta2": -0.1}, "beta1 and beta2"),
        ({"tau": 0.0}, "tau must be positive"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        so.ServerOptimizerConfig(**kwargs)


# ------------------------------------------------------------------------------------- FedProx


def _tiny_model() -> TorchModel:
    """Two-class logistic regression on one feature, all weights zero: flat = [W0, W1, b0, b1]."""
    torch.manual_seed(0)
    model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(1, 2)))
    model.set_flat(torch.zeros(4))
    return model


def test_fedprox_proximal_step_by_hand() -> None:
    # Two identical examples x = 1, y = 1; SGD with lr = 1 and batch size 1 takes two steps.
    # Step 1 at w = 0: p = [0.5, 0.5], dCE/dz = p - e_1 = [0.5, -0.5], and the proximal term
    #   mu (w - w_global) is 0, so w1 = -[0.5, -0.5, 0.5, -0.5] = [-0.5, 0.5, -0.5, 0.5].
    # Step 2: z = [-1, 1], p = [s, 1 - s] with s = 1 / (1 + e^2), dCE/dz = [s, -s];
    #   proximal gradient mu * w1 = 0.5 * [-0.5, 0.5, -0.5, 0.5] = [-0.25, 0.25, -0.25, 0.25]
    #   w2 = w1 - [s - 0.25, -s + 0.25, s - 0.25, -s + 0.25] = [-0.25 - s, 0.25 + s, ...].
    s = 1.0 / (1.0 + math.exp(2.0))
    x, y = torch.ones(2, 1), torch.ones(2, dtype=torch.long)
    expected = {
        0.0: [-0.5 - s, 0.5 + s, -0.5 - s, 0.5 + s],
        0.5: [-0.25 - s, 0.25 + s, -0.25 - s, 0.25 + s],
    }
    for mu, want in expected.items():
        model = _tiny_model()
        cfg = training.LocalTraining(lr=1.0, batch_size=1, proximal_mu=mu)
        stats = training.train(
            model,
            x,
            y,
            cfg,
            generator=torch.Generator().manual_seed(0),
            global_params=torch.zeros(4),
        )
        assert stats.steps == 2
        assert model.get_flat().tolist() == pytest.approx(want, abs=1e-6)


def _skewed_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (40,), generator=g)
    x = torch.randn(40, 5, generator=g) + 2.0 * nn.functional.one_hot(y, 5).float()
    return x, y


def test_fedprox_with_mu_zero_is_fedavg_in_local_training() -> None:
    """The full client training path with ``proximal_mu = 0`` is bit-for-bit FedAvg's."""
    x, y = _skewed_data(0)
    results = []
    for mu, anchor in [(0.0, None), (0.0, "global")]:
        torch.manual_seed(1)
        model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(5, 3)))
        global_params = model.get_flat()
        cfg = training.LocalTraining(
            lr=0.3, momentum=0.5, weight_decay=1e-3, epochs=3, batch_size=8, proximal_mu=mu
        )
        training.train(
            model,
            x,
            y,
            cfg,
            generator=torch.Generator().manual_seed(7),
            global_params=global_params if anchor else None,
        )
        results.append(model.get_flat())
    assert not torch.equal(results[0], global_params)  # it trained
    assert torch.equal(results[0], results[1])


def _one_round(kind: StrategyKind, proximal_mu: float) -> torch.Tensor:
    torch.manual_seed(3)
    model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(5, 3)))
    data = {cid: ClientData(*_skewed_data(10 + cid)) for cid in range(3)}
    app = ClientApp(model, data)
    client_config = {
        "optimizer": "sgd",
        "lr": 0.2,
        "epochs": 4,
        "batch_size": 8,
        "proximal_mu": proximal_mu,
    }
    strategy = fedopt.create(kind, client_config=client_config, num_clients=3)
    driver = RoundDriver(
        InProcessTransport(app.handle, list(data)),
        strategy,
        dim=model.spec.size,
        clients_per_round=3,
        min_clients=3,
        seed=0,
    )
    params = model.get_flat()
    state = strategy.init(params)
    for round_ in (1, 2):
        result = driver.fit_round(round_, params, state)
        params, state = result.params, result.state
    return params


def test_fedprox_with_mu_zero_is_fedavg_through_strategy() -> None:
    """Two rounds through Strategy, driver, encoding and ClientApp give identical models."""
    fedavg = _one_round(StrategyKind.FEDAVG, 0.0)
    fedprox = _one_round(StrategyKind.FEDPROX, 0.0)
    assert torch.equal(fedprox, fedavg)
    # and the proximal term does act when mu > 0
    assert not torch.equal(_one_round(StrategyKind.FEDPROX, 1.0), fedavg)


def test_fedprox_keeps_its_mu_and_others_zero_it() -> None:
    config = {"proximal_mu": 0.25}
    fedprox = fedopt.create(StrategyKind.FEDPROX, client_config=config, num_clients=1)
    fedavg = fedopt.create(StrategyKind.FEDAVG, client_config=config, num_clients=1)
    assert fedprox.fit_instructions(fedprox.init(X0))[0]["proximal_mu"] == 0.25
    assert fedavg.fit_instructions(fedavg.init(X0))[0]["proximal_mu"] == 0.0


def test_the_mean_adds_replies_without_stacking_them_to_the_same_bits() -> None:
    """FedAvg's built-in mean takes the replies' updates one by one (no [K, D] stack of the
    cohort); the result is bit for bit the mean of their stack. A subclass of the mean, which may
    override ``aggregate``, still gets the stack."""
    generator = torch.Generator().manual_seed(3)
    updates = torch.randn(7, 50, generator=generator)
    sizes = [3, 10, 1, 7, 7, 2, 40]
    replies = [
        messages.FitReply(1, cid, updates[cid].clone(), num_examples=n)
        for cid, n in enumerate(sizes)
    ]
    params = torch.randn(50, generator=generator)
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=7)
    _, new_params, left_out = strategy.aggregate_reporting(
        strategy.init(params), params, replies, round_=1
    )
    expected = aggregation.weighted_mean(updates, torch.tensor([float(n) for n in sizes]))
    assert torch.equal(new_params, params + expected) and left_out is None

    seen: list[torch.Tensor] = []

    class Recorded(Mean):
        def aggregate(self, updates, weights, *, state, context):  # type: ignore[no-untyped-def]
            seen.append(updates)
            return super().aggregate(updates, weights, state=state, context=context)

    recorded = fedopt.create(
        StrategyKind.FEDAVG, client_config={}, num_clients=7, aggregator=Recorded()
    )
    _, same, _ = recorded.aggregate_reporting(recorded.init(params), params, replies, round_=1)
    assert torch.equal(same, new_params)
    assert len(seen) == 1 and torch.equal(seen[0], updates)
