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

from conftest import committed_state, faulted_rounds, tiny_config
from fedguard.algorithms.optimizers import committed, newton, scaffold
from fedguard.client import training
from fedguard.client.app import CONTROL, ClientApp
from fedguard.client.data import ClientData
from fedguard.experiment import checkpoint, config
from fedguard.experiment.assembly import Experiment
from fedguard.models.adapter import TorchModel
from fedguard.protocol import features, fedopt, messages
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.strategy import AGGREGATED, ServerState, StrategyKind
from fedguard.simulation.dropout import FitFault
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


def _fit(
    app: ClientApp, round_: int, server_control: list[float], *, told: int
) -> messages.FitReply:
    """Client 0's reply to a round-``round_`` task with the server's ``c`` and the server's
    record of its last aggregated round ``told``."""
    config: dict[str, messages.Scalar] = {
        "optimizer": "sgd",
        "lr": 1.0,
        "epochs": 1,
        "batch_size": 1,
        "seed": 0,
        features.SCAFFOLD_AGGREGATED: told,
    }
    task = messages.FitTask(
        round_, 0, torch.zeros(4), config, {CONTROL: torch.tensor(server_control)}
    )
    reply = messages.decode(app.handle(0, messages.encode(task)), messages.FitReply)
    assert isinstance(reply, messages.FitReply)
    return reply


def _one_example_client() -> ClientApp:
    return ClientApp(
        _tiny_model(), {0: ClientData(torch.ones(1, 1), torch.ones(1, dtype=torch.long))}
    )


def test_scaffold_client_by_hand() -> None:
    app = _one_example_client()
    # Round 1, c = [0.1, 0.2, 0.3, 0.4], c_i = 0: one SGD step with lr = 1 on g + c - c_i
    #   y = 0 - (G0 + c) = [-0.6, 0.3, -0.8, 0.1]
    #   c_i+ = c_i - c - (y - x) / (1 * 1) = -c - y = [0.5, -0.5, 0.5, -0.5] = G0: with one local
    #   step, option II recovers the local gradient at the global model.
    reply = _fit(app, 1, [0.1, 0.2, 0.3, 0.4], told=0)
    assert reply.update.tolist() == pytest.approx([-0.6, 0.3, -0.8, 0.1], abs=1e-6)
    assert reply.tensors["control_delta"].tolist() == pytest.approx(G0, abs=1e-6)
    # c_i+ is pending until the server says its delta entered c; c_i (zero) stays committed
    assert app.state[0][features.CONTROL_PENDING].tolist() == pytest.approx(G0, abs=1e-6)
    assert app.state[0][CONTROL].tolist() == [0.0] * 4
    assert app.state[0][features.CONTROL_ROUNDS].tolist() == [0, 1]
    # Round 2 from the same point with c = 0, told that round 1's delta entered c: the client
    # commits c_i = G0, so the correction c - c_i = -G0 cancels the gradient, the client does
    # not move and its control variate stays G0.
    reply = _fit(app, 2, [0.0, 0.0, 0.0, 0.0], told=1)
    assert reply.update.tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert reply.tensors["control_delta"].tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert app.state[0][CONTROL].tolist() == pytest.approx(G0, abs=1e-6)
    assert app.state[0][features.CONTROL_PENDING].tolist() == pytest.approx(G0, abs=1e-6)
    assert app.state[0][features.CONTROL_ROUNDS].tolist() == [1, 2]


def test_a_scaffold_client_whose_delta_did_not_enter_c_trains_again_from_its_old_variate() -> None:
    """Told that round 1's delta did not enter ``c`` (its reply was lost), the client drops its
    pending ``c_i+`` and trains round 2 from ``c_i = 0``: the reply of a client that never
    trained in round 1. Told a round its state does not hold, it refuses."""
    app = _one_example_client()
    _fit(app, 1, [0.1, 0.2, 0.3, 0.4], told=0)
    again = _fit(app, 2, [0.0, 0.0, 0.0, 0.0], told=0)
    fresh = _fit(_one_example_client(), 2, [0.0, 0.0, 0.0, 0.0], told=0)
    assert torch.equal(again.update, fresh.update)
    assert torch.equal(again.tensors["control_delta"], fresh.tensors["control_delta"])
    # the plain gradient step from w = 0: y = -G0, and c_i+ = -y = G0
    assert again.update.tolist() == pytest.approx([-x for x in G0], abs=1e-6)
    assert app.state[0][features.CONTROL_ROUNDS].tolist() == [0, 2]
    assert app.state[0][CONTROL].tolist() == [0.0] * 4
    for told in (1, 3):  # neither the committed round (0) nor the pending one (2)
        with pytest.raises(ValueError, match=r"SCAFFOLD: .* round 0 \(committed\) and 2 \(pending"):
            _fit(app, 3, [0.0] * 4, told=told)
    with pytest.raises(ValueError, match="control variate holds this client's update of round 4"):
        _fit(_one_example_client(), 5, [0.0] * 4, told=4)  # a client whose state was lost


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
    state, params = strategy.aggregate(state, params, replies, round_=7)
    # model, weighted by the example counts 3 and 5 (neither 1, so each weight shows):
    # [1, -1] + (3*[1, 2] + 5*[3, -2]) / 8 = [1, -1] + [18, -4] / 8 = [3.25, -1.5]
    assert params.tolist() == [3.25, -1.5]
    # control: 0 + (2 / 4) * mean([1, 0], [3, -2]) = [1, -0.5] (an unweighted mean)
    assert state.control.tolist() == [1.0, -0.5]
    config, tensors = strategy.fit_instructions(state)
    assert tensors[CONTROL].tolist() == [1.0, -0.5]
    assert config["proximal_mu"] == 0.0
    # the record of the rounds whose control delta entered c, told to each client on its own
    assert state.aggregated.tolist() == [7, 7]
    restored = strategy.restore(dict(state))
    told = [strategy.client_instructions(restored, c) for c in range(4)]
    assert told == [{features.SCAFFOLD_AGGREGATED: r} for r in (7, 7, 0, 0)]
    # a checkpoint from before the record: every client told 0, its current c_i committed
    earlier = {k: v for k, v in state.items() if k != AGGREGATED}
    assert strategy.client_instructions(strategy.restore(earlier), 1) == {
        features.SCAFFOLD_AGGREGATED: 0
    }


# -------------------------------------------------------- SCAFFOLD: a reply that is not aggregated

N = 6  # the population of tiny_config
# server_lr 0.7, client lr 0.05 and the Dirichlet partition's unequal example counts (the model's
# mean weighs by them, c's does not): no constant of the run is 1
SCAFFOLD = {
    "server": {"strategy": "scaffold", "clients_per_round": 4, "min_clients": 3, "server_lr": 0.7},
    "client": {"lr": 0.05},
    "evaluation": {"every": 0},
}


def _scaffold_rounds(faults: dict[tuple[int, int], FitFault], rounds: int = 3) -> list[dict]:
    """``rounds`` SCAFFOLD rounds of 4 of 6 clients with ``faults`` injected (see
    :func:`conftest.faulted_rounds`)."""
    return faulted_rounds(tiny_config(**SCAFFOLD), faults, rounds)


def _c_i(after: dict, cid: int) -> torch.Tensor:
    """Client ``cid``'s committed ``c_i`` after a round: what the server's record settles."""
    return committed_state(after, cid, features.SCAFFOLD_STATE)


def _assert_c_is_the_mean_of_the_committed_c_i(after: dict) -> None:
    """``c = (1/N) sum_i c_i`` (Algorithm 1's invariant), the sum in float64 here; ``c`` is
    the float32 sum of the rounds' float32 steps, hence the tolerance."""
    c = after["server"].control
    reference = torch.stack([_c_i(after, cid).double() for cid in range(N)]).sum(0) / N
    assert float(c.abs().max()) > 1e-3
    torch.testing.assert_close(c.double(), reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fault", [FitFault.LOST, FitFault.REJECTED])
def test_a_scaffold_reply_that_is_not_aggregated_leaves_the_client_as_if_it_never_trained(
    fault: FitFault,
) -> None:
    """Client ``k`` trains in round 1, then its reply is lost (or arrives with a NaN update and
    is rejected): its ``c_i+ - c_i`` never enters ``c``. The run equals the one where ``k``'s
    round-1 task never reached it, after every round: the same model, ``c``, record and
    committed ``c_i`` for every client (``k`` trains again in round 2 or 3, from ``c_i = 0``),
    and ``c`` is the mean of the committed ``c_i`` over the population after every round."""
    plain = _scaffold_rounds({})
    first, later = plain[0]["sampled"], plain[1]["sampled"] + plain[2]["sampled"]
    k = next(c for c in first if c in later)  # its c_i matters again in a later round
    faulted = _scaffold_rounds({(1, k): fault})
    never = _scaffold_rounds({(1, k): FitFault.UNREACHABLE})
    counted = "clients_failed" if fault is FitFault.LOST else "clients_rejected"
    assert faulted[0]["metrics"][counted] == 1 and faulted[0]["metrics"]["clients_completed"] == 3
    # after round 1, k has trained: c_i+ is pending, and the record settles k to c_i = 0
    one = faulted[0]
    assert one["clients"][k][features.CONTROL_ROUNDS].tolist() == [0, 1]
    assert float(one["clients"][k][features.CONTROL_PENDING].abs().sum()) > 0
    assert committed.last_aggregated(one["server"].aggregated, k) == 0
    assert float(_c_i(one, k).abs().sum()) == 0
    assert k not in never[0]["clients"]
    for f, n in zip(faulted, never, strict=True):
        assert torch.equal(f["params"], n["params"])
        assert torch.equal(f["server"].control, n["server"].control)
        assert torch.equal(f["server"].aggregated, n["server"].aggregated)
        for cid in range(N):
            assert torch.equal(_c_i(f, cid), _c_i(n, cid)), cid
    for run in (faulted, never, plain):
        for after in run:
            _assert_c_is_the_mean_of_the_committed_c_i(after)
    # and without the fault client k's round-1 delta counts: the runs differ
    assert float((plain[-1]["params"] - faulted[-1]["params"]).abs().max()) > 1e-4


def test_a_scaffold_checkpoint_from_before_the_record_resumes_with_each_c_i_committed() -> None:
    """A checkpoint written before the record existed holds ``c`` and each client's ``c_i``
    (``client.<id>.control``) only. Resumed after round 2, round 3 gives the model, ``c`` and
    committed ``c_i`` of the run that never stopped, and ``c`` stays their mean."""
    cfg = config.validate(tiny_config(**SCAFFOLD))
    whole = Experiment(cfg)
    resumed = Experiment(cfg)
    try:
        params, state = whole.initial_params, whole.strategy.init(whole.initial_params)
        for r in (1, 2):
            result = whole.driver.fit_round(r, params, state)
            params, state = result.params, result.state
        after_2 = {"params": params, "server": ServerState.of(state)}
        after_2["clients"] = {cid: dict(named) for cid, named in whole.client_state.items()}
        old = {
            k: v
            for k, v in whole.checkpoint_tensors(params, state).items()
            if k != "server." + AGGREGATED and not k.startswith("client.")
        }
        for cid in whole.client_state:
            old[f"client.{cid}.{CONTROL}"] = _c_i(after_2, cid)
        p2, s2 = resumed.restore(checkpoint.Checkpoint(2, old, {}))
        assert ServerState.of(s2).aggregated.numel() == 0
        assert all(named.keys() == {CONTROL} for named in resumed.client_state.values())
        straight = whole.driver.fit_round(3, params, state)
        after_stop = resumed.driver.fit_round(3, p2, s2)
    finally:
        whole.close()
        resumed.close()
    assert torch.equal(after_stop.params, straight.params)
    assert torch.equal(
        ServerState.of(after_stop.state).control, ServerState.of(straight.state).control
    )
    ends = [
        {"params": r.params, "server": ServerState.of(r.state), "clients": e.client_state}
        for r, e in ((straight, whole), (after_stop, resumed))
    ]
    for cid in range(N):
        assert torch.equal(_c_i(ends[0], cid), _c_i(ends[1], cid)), cid
    _assert_c_is_the_mean_of_the_committed_c_i(ends[1])


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
