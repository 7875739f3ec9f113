"""SCAFFOLD's control variates and the federated Newton step, against numbers computed by hand.

The client-side checks use a two-class logistic regression on one feature with all weights zero
(flat vector ``[W0, W1, b0, b1]``): at ``w = 0`` the softmax is ``[0.5, 0.5]``, so for an example
``x = 1, y = 1`` the loss gradient is ``g = [0.5, -0.5, 0.5, -0.5]`` and the cross-entropy's
Hessian in the logits is ``0.25 * [[1, -1], [-1, 1]]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedguard.algorithms.optimizers import newton, scaffold
from fedguard.client import training
from fedguard.client.app import CONTROL, ClientApp
from fedguard.client.data import ClientData
from fedguard.models.adapter import TorchModel
from fedguard.protocol import fedopt, messages
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.strategy import StrategyKind
from fedguard.simulation.inprocess import InProcessTransport

G0 = [0.5, -0.5, 0.5, -0.5]  # loss gradient at w = 0 for x = 1, y = 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: intra-op threads only contend on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(flat: list[float] | None = None) -> TorchModel:
    torch.manual_seed(0)
    model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(1, 2)))
    model.set_flat(torch.tensor(flat if flat is not None else [0.0] * 4))
    return model


# ----------------------------------------------------------------------------- SCAFFOLD pieces


def test_correction_by_hand() -> None:
    out = scaffold.correction(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]))
    assert out.tolist() == [0.5, 3.0]


def test_client_control_update_by_hand() -> None:
    # c_i+ = c_i - c - delta / (K lr) = [0.5, -1] - [1, 2] - [-0.2, 0.4] / (4 * 0.125)
    #      = [-0.5, -3] - [-0.4, 0.8] = [-0.1, -3.8]
    out = scaffold.client_control_update(
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.5, -1.0]),
        torch.tensor([-0.2, 0.4]),
        local_steps=4,
        lr=0.125,
    )
    assert out.tolist() == pytest.approx([-0.1, -3.8], abs=1e-6)


def test_server_control_update_by_hand() -> None:
    # c + (|S| / N) mean(deltas) = [1, 2] + (2 / 4) * mean([1, 0], [3, -2]) = [1, 2] + 0.5 * [2, -1]
    out = scaffold.server_control_update(
        torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0], [3.0, -2.0]]), num_clients=4
    )
    assert out.tolist() == [2.0, 1.5]
    # full participation: the plain mean
    out = scaffold.server_control_update(
        torch.zeros(2), torch.tensor([[1.0, 0.0], [3.0, -2.0]]), num_clients=2
    )
    assert out.tolist() == [2.0, -1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_steps": 0, "lr": 0.1}, "at least one local step"),
        ({"local_steps": 1, "lr": 0.0}, "positive local learning rate"),
    ],
)
def test_client_control_update_refuses_degenerate_steps(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        scaffold.client_control_update(torch.zeros(1), torch.zeros(1), torch.zeros(1), **kwargs)


def test_server_control_update_refuses_empty_cohort() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        scaffold.server_control_update(torch.zeros(2), torch.zeros(0, 2), num_clients=3)


# -------------------------------------------------------------------------- SCAFFOLD end to end


def _fit(app: ClientApp, round_: int, server_control: list[float]) -> messages.FitReply:
    task = messages.FitTask(
        round_,
        0,
        torch.zeros(4),
        {"optimizer": "sgd", "lr": 1.0, "epochs": 1, "batch_size": 1, "seed": 0},
        {CONTROL: torch.tensor(server_control)},
    )
    reply = messages.decode(app.handle(0, messages.encode(task)), messages.FitReply)
    assert isinstance(reply, messages.FitReply)
    return reply


def test_scaffold_client_by_hand() -> None:
    app = ClientApp(
        _tiny_model(), {0: ClientData(torch.ones(1, 1), torch.ones(1, dtype=torch.long))}
    )
    # Round 1, c = [0.1, 0.2, 0.3, 0.4], c_i = 0: one SGD step with lr = 1 on g + c - c_i
    #   y = 0 - (G0 + c) = [-0.6, 0.3, -0.8, 0.1]
    #   c_i+ = c_i - c - (y - x) / (1 * 1) = -c - y = [0.5, -0.5, 0.5, -0.5] = G0: with one local
    #   step, option II recovers the local gradient at the global model.
    reply = _fit(app, 1, [0.1, 0.2, 0.3, 0.4])
    assert reply.update.tolist() == pytest.approx([-0.6, 0.3, -0.8, 0.1], abs=1e-6)
    assert reply.tensors["control_delta"].tolist() == pytest.approx(G0, abs=1e-6)
    assert app.state[0][CONTROL].tolist() == pytest.approx(G0, abs=1e-6)
    # Round 2 from the same point with c = 0: the correction c - c_i = -G0 cancels the gradient,
    # so the client does not move and its control variate stays G0.
    reply = _fit(app, 2, [0.0, 0.0, 0.0, 0.0])
    assert reply.update.tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert reply.tensors["control_delta"].tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert app.state[0][CONTROL].tolist() == pytest.approx(G0, abs=1e-6)


def test_scaffold_server_by_hand() -> None:
    strategy = fedopt.create(StrategyKind.SCAFFOLD, client_config={}, num_clients=4)
    params = torch.tensor([1.0, -1.0])
    state = strategy.init(params)
    assert state.control.tolist() == [0.0, 0.0]
    replies = [
        messages.FitReply(
            1, 0, torch.tensor([1.0, 2.0]), 3, tensors={"control_delta": torch.tensor([1.0, 0.0])}
        ),
        messages.FitReply(
            1, 1, torch.tensor([3.0, -2.0]), 5, tensors={"control_delta": torch.tensor([3.0, -2.0])}
        ),
    ]
    state, params = strategy.aggregate(state, params, replies)
    # model, weighted by the example counts 3 and 5 (neither 1, so each weight shows):
    # [1, -1] + (3*[1, 2] + 5*[3, -2]) / 8 = [1, -1] + [18, -4] / 8 = [3.25, -1.5]
    assert params.tolist() == [3.25, -1.5]
    # control: 0 + (2 / 4) * mean([1, 0], [3, -2]) = [1, -0.5] (an unweighted mean)
    assert state.control.tolist() == [1.0, -0.5]
    config, tensors = strategy.fit_instructions(state)
    assert tensors[CONTROL].tolist() == [1.0, -0.5]
    assert config["proximal_mu"] == 0.0


# ------------------------------------------------------------------------------ Newton direction


def test_newton_direction_by_hand() -> None:
    # n = 2: g = [2, 4] / 2 = [1, 2], H = [[4, 2], [2, 6]] / 2 = [[2, 1], [1, 3]], det H = 5,
    # H^-1 = [[3, -1], [-1, 2]] / 5, step = -H^-1 g = -[3 - 2, -1 + 4] / 5 = [-0.2, -0.6].
    step = newton.newton_direction(
        torch.tensor([2.0, 4.0]), torch.tensor([[4.0, 2.0], [2.0, 6.0]]), 2
    )
    assert step.dtype == torch.float32
    assert step.tolist() == pytest.approx([-0.2, -0.6], abs=1e-7)


def test_newton_direction_with_damping_by_hand() -> None:
    # H + 1 I = [[3, 1], [1, 4]], det 11, step = -[[4, -1], [-1, 3]] [1, 2] / 11 = [-2/11, -5/11]
    step = newton.newton_direction(
        torch.tensor([2.0, 4.0]), torch.tensor([[4.0, 2.0], [2.0, 6.0]]), 2, damping=1.0
    )
    assert step.tolist() == pytest.approx([-2 / 11, -5 / 11], abs=1e-7)


def test_newton_direction_symmetrises_the_hessian() -> None:
    # (H + H^T) / 2 of [[4, 1], [3, 6]] is [[4, 2], [2, 6]]: the same step as above.
    step = newton.newton_direction(
        torch.tensor([2.0, 4.0]), torch.tensor([[4.0, 1.0], [3.0, 6.0]]), 2
    )
    assert step.tolist() == pytest.approx([-0.2, -0.6], abs=1e-7)


def test_newton_direction_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="Expected a 2x2 Hessian"):
        newton.newton_direction(torch.zeros(2), torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="positive example count"):
        newton.newton_direction(torch.zeros(2), torch.eye(2), 0)


# ---------------------------------------------------------------------------- Newton statistics


def test_newton_statistics_at_zero_by_hand() -> None:
    # Two examples x = 1, y = 1 at w = 0: gradient sum 2 * G0; with z = [W0 + b0, W1 + b1] the
    # Hessian is J^T (0.25 u u^T) J with u = [1, -1], J^T u = [1, -1, 1, -1]; weight decay adds
    # lambda * n * I = 0.1 * 2 * I. The loss is log 2 (the penalty is 0 at w = 0).
    stats = training.newton_statistics(
        _tiny_model(), torch.ones(2, 1), torch.ones(2, dtype=torch.long), weight_decay=0.1
    )
    v = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    expected_h = 2 * 0.25 * torch.outer(v, v) + 0.2 * torch.eye(4, dtype=torch.float64)
    assert stats.num_examples == 2
    assert stats.gradient_sum.tolist() == pytest.approx([2 * g for g in G0], abs=1e-12)
    torch.testing.assert_close(stats.hessian_sum, expected_h, rtol=0, atol=1e-12)
    assert stats.loss == pytest.approx(math.log(2.0), abs=1e-12)


def test_newton_statistics_off_zero_by_hand() -> None:
    # w = [W0, W1, b0, b1] = [1, 0, 0, 0], one example x = 2, y = 0: z = [2, 0],
    # p = [1 - s, s] with s = 1 / (1 + e^2); dCE/dz = p - e_0 = [-s, s]
    # gradient = [x * -s, x * s, -s, s] + lambda * w = [-2s + 0.5, 2s, -s, s] (lambda = 0.5)
    # Hessian = s (1 - s) v v^T + lambda I with v = J^T [1, -1] = [2, -2, 1, -1]
    # loss = -log(1 - s) + lambda / 2 * ||w||^2 = log(1 + e^-2) + 0.25
    s = 1.0 / (1.0 + math.exp(2.0))
    stats = training.newton_statistics(
        _tiny_model([1.0, 0.0, 0.0, 0.0]),
        torch.tensor([[2.0]]),
        torch.tensor([0]),
        weight_decay=0.5,
    )
    v = torch.tensor([2.0, -2.0, 1.0, -1.0], dtype=torch.float64)
    expected_h = s * (1 - s) * torch.outer(v, v) + 0.5 * torch.eye(4, dtype=torch.float64)
    assert stats.gradient_sum.tolist() == pytest.approx([-2 * s + 0.5, 2 * s, -s, s], abs=1e-7)
    torch.testing.assert_close(stats.hessian_sum, expected_h, rtol=0, atol=1e-7)
    assert stats.loss == pytest.approx(math.log(1 + math.exp(-2.0)) + 0.25, abs=1e-7)


def test_newton_refuses_the_first_order_trainer() -> None:
    with pytest.raises(ValueError, match="newton_statistics"):
        training.train(
            _tiny_model(),
            torch.ones(1, 1),
            torch.ones(1, dtype=torch.long),
            training.LocalTraining(optimizer=training.LocalOptimizer.NEWTON),
            generator=torch.Generator(),
        )


# ------------------------------------------------------------------ federated Newton end to end


def _client_data(seed: int, n: int, shift: float) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) + shift
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(n, generator=g) > shift).long()
    return ClientData(x, y)


def test_federated_newton_step_is_the_pooled_newton_step() -> None:
    """Sums of client statistics give the centralized step, not the mean of local steps."""
    torch.manual_seed(0)
    model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    data = {0: _client_data(0, 10, -1.0), 1: _client_data(1, 30, 1.0), 2: _client_data(2, 5, 0.0)}
    config = {"optimizer": "newton", "weight_decay": 0.01}
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config=config, num_clients=3)
    driver = RoundDriver(
        InProcessTransport(ClientApp(model, data).handle, list(data)),
        strategy,
        dim=model.spec.size,
        clients_per_round=3,
        min_clients=3,
        seed=0,
    )
    params = model.get_flat()
    result = driver.fit_round(1, params, strategy.init(params))

    model.set_flat(params)
    pooled_x = torch.cat([d.train_x for d in data.values()])
    pooled_y = torch.cat([d.train_y for d in data.values()])
    pooled = training.newton_statistics(model, pooled_x, pooled_y, weight_decay=0.01)
    step = torch.linalg.solve(pooled.hessian_sum, -pooled.gradient_sum)
    torch.testing.assert_close(result.params, (params.double() + step).float(), rtol=0, atol=1e-5)

    local_steps = []
    for d in data.values():
        model.set_flat(params)
        s = training.newton_statistics(model, d.train_x, d.train_y, weight_decay=0.01)
        local_steps.append(torch.linalg.solve(s.hessian_sum, -s.gradient_sum) * s.num_examples)
    mean_of_local = torch.stack(local_steps).sum(0) / pooled.num_examples
    assert float((mean_of_local - step).norm()) > 0.1  # heterogeneous clients: they differ
