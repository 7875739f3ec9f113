"""FedDyn and FedNova against references written here, with constants away from 1.

The client-side checks use a two-class logistic regression on one feature (flat vector
``[W0, W1, b0, b1]``): for logits ``z = W x + b`` the loss gradient of an example ``(x, y)`` is
``(softmax(z) - onehot(y)) * [x, x, 1, 1]``, computed by hand in :func:`_nll_grad`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import committed_state, faulted_rounds, tiny_config
from fedguard.algorithms import robust
from fedguard.algorithms.optimizers import committed, feddyn, fednova
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.experiment import checkpoint, config
from fedguard.experiment.assembly import Experiment
from fedguard.models.adapter import TorchModel
from fedguard.protocol import features, fedopt, messages
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.strategy import AGGREGATED, FEDDYN_H, ServerState, StrategyKind
from fedguard.simulation.dropout import FitFault
from fedguard.simulation.inprocess import InProcessTransport


def _tiny_model(flat: list[float]) -> TorchModel:
    torch.manual_seed(0)
    model = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(1, 2)))
    model.set_flat(torch.tensor(flat))
    return model


def _assert_close(
    got: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1.3e-6, atol: float = 1e-5
) -> None:
    """``got`` equals ``expected`` within ``atol + rtol |expected|`` (shapes and dtypes equal)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.allclose(got, expected, rtol=rtol, atol=atol), (got, expected)


def _nll_grad(w: torch.Tensor, x: float, y: int) -> torch.Tensor:
    """The NLL gradient of ``[W0, W1, b0, b1]`` at one example, by the softmax formula."""
    z = w[:2] * x + w[2:]
    p = torch.exp(z - torch.logsumexp(z, 0))
    dz = p - torch.nn.functional.one_hot(torch.tensor(y), 2).to(p)
    return torch.cat([dz * x, dz])


def _fit(
    app: ClientApp, client: int, params: list[float], cfg: dict[str, messages.Scalar]
) -> messages.FitReply:
    task = messages.FitTask(1, client, torch.tensor(params), {"seed": 0, **cfg}, {})
    reply = messages.decode(app.handle(client, messages.encode(task)), messages.FitReply)
    assert isinstance(reply, messages.FitReply)
    return reply


def _reply(cid: int, update: list[float], n: int, **tensors: torch.Tensor) -> messages.FitReply:
    return messages.FitReply(1, cid, torch.tensor(update), n, tensors=dict(tensors))


# ---------------------------------------------------------------------------------------- FedNova


def test_step_norm_by_hand() -> None:
    assert fednova.step_norm(7) == 7.0
    # momentum 0.5, 3 steps: gradient j weighs (1 - 0.5^(3 - j + 1)) / 0.5 = 1.75, 1.5, 1.0
    assert fednova.step_norm(3, 0.5) == pytest.approx(4.25)
    # the closed form against the sum of the weights for other values
    for steps, rho in ((5, 0.9), (12, 0.3)):
        weights = [(1 - rho ** (steps - j + 1)) / (1 - rho) for j in range(1, steps + 1)]
        assert fednova.step_norm(steps, rho) == pytest.approx(sum(weights))
    with pytest.raises(ValueError, match="at least one local step"):
        fednova.step_norm(0)
    with pytest.raises(ValueError, match="momentum must be in"):
        fednova.step_norm(3, 1.0)


def test_fednova_with_equal_steps_is_fedavg() -> None:
    """Equal step norms: ``tau sum p_i (delta_i / tau) = sum p_i delta_i``, FedAvg's step (at a
    server learning rate of 0.5, weights 3 and 5)."""
    deltas = [[1.0, -2.0, 0.5], [3.0, 1.0, -1.5]]
    norm = fednova.step_norm(4, 0.6)
    nova = fedopt.create(StrategyKind.FEDNOVA, client_config={}, num_clients=2, server_lr=0.5)
    avg = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=2, server_lr=0.5)
    params = torch.tensor([0.25, -0.5, 2.0])
    sent = [[v / norm for v in d] for d in deltas]
    norm_tensor = torch.tensor([norm])
    _, p_nova = nova.aggregate(
        nova.init(params),
        params,
        [
            _reply(0, sent[0], 3, **{features.STEP_NORM: norm_tensor}),
            _reply(1, sent[1], 5, **{features.STEP_NORM: norm_tensor}),
        ],
    )
    _, p_avg = avg.aggregate(
        avg.init(params), params, [_reply(0, deltas[0], 3), _reply(1, deltas[1], 5)]
    )
    _assert_close(p_nova, p_avg)
    # (3 [1, -2, .5] + 5 [3, 1, -1.5]) / 8 = [2.25, -0.125, -0.75], times 0.5
    _assert_close(p_avg, params + 0.5 * torch.tensor([2.25, -0.125, -0.75]))


def test_fednova_with_unequal_steps_by_hand() -> None:
    """Client 0: 3 examples, 2 steps, delta [4, -2]; client 1: 5 examples, 6 steps, delta
    [6, 3]. d = [2, -1] and [1, 0.5]; tau_eff = (3*2 + 5*6) / 8 = 4.5; the step is
    4.5 * (3 [2, -1] + 5 [1, 0.5]) / 8 = 4.5 * [1.375, -0.0625] = [6.1875, -0.28125], where
    FedAvg's is (3 [4, -2] + 5 [6, 3]) / 8 = [5.25, 1.125]."""
    strategy = fedopt.create(StrategyKind.FEDNOVA, client_config={}, num_clients=2)
    params = torch.tensor([1.0, -1.0])
    replies = [
        _reply(0, [2.0, -1.0], 3, **{features.STEP_NORM: torch.tensor([2.0])}),
        _reply(1, [1.0, 0.5], 5, **{features.STEP_NORM: torch.tensor([6.0])}),
    ]
    _, new = strategy.aggregate(strategy.init(params), params, replies)
    assert new.tolist() == pytest.approx([7.1875, -1.28125])
    fedavg_step = [1.0 + 5.25, -1.0 + 1.125]
    assert abs(new[0].item() - fedavg_step[0]) > 0.5


def test_fednova_client_normalises_by_its_momentum_steps() -> None:
    """Three SGD steps (batch 1) with momentum 0.5: the reply is the FedAvg client's update over
    ``||a|| = 4.25``, with 4.25 as its step norm."""
    x = torch.tensor([[1.0], [-2.0], [0.5]])
    data = {0: ClientData(x, torch.tensor([1, 0, 1]))}
    cfg: dict[str, messages.Scalar] = {
        "optimizer": "sgd",
        "lr": 0.3,
        "momentum": 0.5,
        "epochs": 1,
        "batch_size": 1,
    }
    start = [0.2, -0.1, 0.05, 0.3]
    plain = _fit(ClientApp(_tiny_model(start), data), 0, start, cfg)
    nova = _fit(ClientApp(_tiny_model(start), data), 0, start, {**cfg, features.FEDNOVA: True})
    assert nova.tensors[features.STEP_NORM].tolist() == pytest.approx([4.25])
    _assert_close(nova.update * 4.25, plain.update)
    refused = {**cfg, "optimizer": "adam", features.FEDNOVA: True}
    with pytest.raises(ValueError, match="FedNova normalises"):
        _fit(ClientApp(_tiny_model(start), data), 0, start, refused)


def _driver_round(sizes: dict[int, int], kind: StrategyKind) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of two clients with ``sizes`` examples (batch 2, momentum 0.4) under ``kind``;
    returns the new parameters and the starting ones."""
    data = {}
    for cid, n in sizes.items():
        g = torch.Generator().manual_seed(7 + cid)
        x = torch.randn(n, 1, generator=g) + (1.5 if cid else -1.0)
        data[cid] = ClientData(x, (x[:, 0] > 0.3 * cid).long())
    model = _tiny_model([0.3, -0.2, 0.1, 0.0])
    cfg = {"optimizer": "sgd", "lr": 0.2, "momentum": 0.4, "epochs": 1, "batch_size": 2}
    strategy = fedopt.create(kind, client_config=cfg, num_clients=2, server_lr=0.7)
    driver = RoundDriver(
        InProcessTransport(ClientApp(model, data).handle, list(data)),
        strategy,
        dim=model.spec.size,
        clients_per_round=len(data),
        min_clients=len(data),
        seed=0,
    )
    params = model.get_flat()
    return driver.fit_round(1, params, strategy.init(params)).params, params


def test_fednova_run_equals_fedavg_with_equal_steps_and_its_formula_otherwise() -> None:
    """Through the round driver: 6 and 6 examples (3 steps each) give FedAvg's model; 4 and 12
    (2 and 6 steps) give ``0.7 tau_eff sum p_i d_i`` of the clients' own updates, not FedAvg's."""
    nova, _ = _driver_round({0: 6, 1: 6}, StrategyKind.FEDNOVA)
    avg, _ = _driver_round({0: 6, 1: 6}, StrategyKind.FEDAVG)
    _assert_close(nova, avg)

    nova, params = _driver_round({0: 4, 1: 12}, StrategyKind.FEDNOVA)
    avg, _ = _driver_round({0: 4, 1: 12}, StrategyKind.FEDAVG)
    # the clients' raw updates, from FedAvg's step: avg = params + 0.7 (4 u0 + 12 u1) / 16, and
    # each client alone (a one-client round) gives u_i
    updates = []
    for cid, n in ((0, 4), (1, 12)):
        alone, p0 = _driver_round({cid: n}, StrategyKind.FEDAVG)
        updates.append((alone - p0) / 0.7)
    norms = [fednova.step_norm(2, 0.4), fednova.step_norm(6, 0.4)]
    tau_eff = (4 * norms[0] + 12 * norms[1]) / 16
    expected = (
        params + 0.7 * tau_eff * (4 * updates[0] / norms[0] + 12 * updates[1] / norms[1]) / 16
    )
    _assert_close(nova, expected, rtol=0, atol=1e-5)
    _assert_close(avg, params + 0.7 * (4 * updates[0] + 12 * updates[1]) / 16, rtol=0, atol=1e-5)
    assert float((nova - avg).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------- FedDyn


def test_feddyn_server_update_by_hand() -> None:
    """alpha 0.2, 2 of m = 5 clients, h = [0.5, 0.25]: mean update [2, 0];
    h' = h - 0.2 * (2/5) * [2, 0] = [0.34, 0.25];
    theta' = [1, -2] + [2, 0] - h' / 0.2 = [1.3, -3.25]. The example counts (3, 5) do not weigh."""
    strategy = fedopt.create(
        StrategyKind.FEDDYN, client_config={"lr": 0.1}, num_clients=5, feddyn_alpha=0.2
    )
    params = torch.tensor([1.0, -2.0])
    state = strategy.init(params)
    assert state.h.tolist() == [0.0, 0.0]
    state = type(state)(state.optimizer, h=torch.tensor([0.5, 0.25]))
    replies = [_reply(0, [1.0, 2.0], 3), _reply(1, [3.0, -2.0], 5)]
    state, new = strategy.aggregate(state, params, replies)
    assert state.h.tolist() == pytest.approx([0.34, 0.25])
    assert new.tolist() == pytest.approx([1.3, -3.25])
    restored = strategy.restore(dict(state.tensors()))
    assert restored.h.tolist() == pytest.approx([0.34, 0.25])
    cfg, tensors = strategy.fit_instructions(state)
    assert cfg[features.FEDDYN_ALPHA] == 0.2 and cfg["lr"] == 0.1 and tensors == {}
    # the record of aggregated rounds: clients 0 and 1 in round 7, then 3 alone in round 9
    state, _ = strategy.aggregate(state, params, replies, round_=7)
    state, _ = strategy.aggregate(state, params, [_reply(3, [0.0, 1.0], 2)], round_=9)
    assert ServerState.of(state).aggregated.tolist() == [7, 7, 0, 9]
    restored = strategy.restore(dict(state))
    told = [strategy.client_instructions(restored, c)[features.FEDDYN_AGGREGATED] for c in range(6)]
    assert told == [7, 7, 0, 9, 0, 0]
    # a checkpoint that kept the record under its earlier name loads it
    earlier = {("feddyn." if k == AGGREGATED else "") + k: v for k, v in state.items()}
    assert "feddyn.aggregated" in earlier and AGGREGATED not in earlier
    assert strategy.restore(earlier).aggregated.tolist() == [7, 7, 0, 9]
    with pytest.raises(ValueError, match="alpha must be positive"):
        feddyn.server_update(params, state.h, torch.ones(1, 2), alpha=0.0, num_clients=5)


def test_feddyn_client_objective_gradient_by_hand() -> None:
    """Two SGD steps (one example, two epochs, so the order is fixed) on
    ``L(w) - <g, w> + alpha/2 ||w - w_glob||^2`` with alpha 0.3, lr 0.5 and a stored ``g``: the
    second step sees the quadratic term. The new state is ``g - alpha * delta``, pending until
    the server says this round's update was aggregated; ``g`` stays the committed one."""
    alpha, lr, x, y = 0.3, 0.5, -2.0, 1
    start = [0.2, -0.1, 0.05, 0.0]
    g = torch.tensor([0.1, -0.2, 0.3, -0.4])
    data = {0: ClientData(torch.tensor([[x]]), torch.tensor([y]))}
    cfg: dict[str, messages.Scalar] = {
        "optimizer": "sgd",
        "lr": lr,
        "epochs": 2,
        "batch_size": 1,
        features.FEDDYN_ALPHA: alpha,
        features.FEDDYN_AGGREGATED: 0,
    }
    app = ClientApp(_tiny_model(start), data)
    app.state[0] = {features.FEDDYN_GRADIENT: g.clone()}
    reply = _fit(app, 0, start, cfg)
    w_glob = torch.tensor(start, dtype=torch.float64)
    w = w_glob.clone()
    for _ in range(2):
        w = w - lr * (_nll_grad(w, x, y) - g.double() + alpha * (w - w_glob))
    delta = (w - w_glob).float()
    _assert_close(reply.update, delta, rtol=0, atol=1e-6)
    _assert_close(app.state[0][features.FEDDYN_PENDING], g - alpha * delta, rtol=0, atol=1e-6)
    assert torch.equal(app.state[0][features.FEDDYN_GRADIENT], g)
    assert app.state[0][features.FEDDYN_ROUNDS].tolist() == [0, 1]
    # without the regulariser the client lands elsewhere: the terms are not a no-op
    plain = _fit(ClientApp(_tiny_model(start), data), 0, start, {**cfg, features.FEDDYN_ALPHA: 0})
    assert float((plain.update - delta).abs().min()) > 1e-2


def _quadratics() -> tuple[torch.Tensor, torch.Tensor]:
    """Four clients' ``L_k(w) = 1/2 (w - c_k)^T diag(a_k) (w - c_k)`` in 3 dimensions."""
    a = torch.tensor(
        [[4.0, 0.5, 1.0], [0.5, 3.0, 2.0], [2.0, 1.0, 0.25], [1.0, 2.5, 3.0]], dtype=torch.float64
    )
    c = torch.tensor(
        [[2.0, -1.0, 0.5], [-3.0, 2.0, 1.5], [1.0, 3.0, -2.0], [0.0, -2.5, 2.5]],
        dtype=torch.float64,
    )
    return a, c


def _local(
    w_glob: torch.Tensor, a: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """40 gradient steps (lr 0.15) from the global model ``[D]`` on each row's objective (rows of
    ``a``, ``c``, ``g``): plain ``L_k`` (``g`` None, FedAvg) or FedDyn's regularised one."""
    w = w_glob.expand_as(c).clone()
    for _ in range(40):
        grad = a * (w - c)
        if g is not None:
            grad = grad + feddyn.correction(g) + alpha * (w - w_glob)
        w = w - 0.15 * grad
    return w


def test_feddyn_reaches_the_global_optimum_where_fedavg_drifts() -> None:
    """Heterogeneous quadratics, 2 of 4 clients per round (alternating), many local steps:
    FedDyn (the strategy's server half, the module's client half) converges to
    ``argmin sum_k L_k = (sum a_k)^-1 sum a_k c_k``; FedAvg converges to another point."""
    a, c = _quadratics()
    optimum = (a * c).sum(0) / a.sum(0)
    alpha = 0.7
    strategy = fedopt.create(
        StrategyKind.FEDDYN, client_config={}, num_clients=4, feddyn_alpha=alpha
    )
    params = torch.zeros(3, dtype=torch.float64)
    state = strategy.init(params)
    grads = torch.zeros(4, 3, dtype=torch.float64)
    fedavg = params.clone()
    for t in range(80):
        cohort = [0, 1] if t % 2 == 0 else [2, 3]
        deltas = _local(params, a[cohort], c[cohort], grads[cohort], alpha) - params
        grads[cohort] = feddyn.client_gradient_update(grads[cohort], deltas, alpha=alpha)
        replies = [messages.FitReply(t, k, deltas[i], 10 + k) for i, k in enumerate(cohort)]
        state, params = strategy.aggregate(state, params, replies)
        if t < 20:  # FedAvg settles within a few rounds
            fedavg = fedavg + (_local(fedavg, a, c, None, 0.0) - fedavg).mean(0)
    assert float((params - optimum).norm()) < 1e-4
    # h is the mean of the clients' gradient states (the paper's invariant)
    _assert_close(state.h, grads.mean(0))
    assert float((fedavg - optimum).norm()) > 0.3


def test_feddyn_state_of_server_and_clients_survives_a_checkpoint() -> None:
    """Two rounds, a checkpoint's tensors (the server's ``h``, every client's ``g_k``) restored
    into a fresh experiment, a third round: the same model and client states as three rounds
    without a stop."""
    cfg = config.validate(
        tiny_config(
            server={"strategy": "feddyn", "feddyn_alpha": 0.2, "clients_per_round": 3},
            evaluation={"every": 0},
        )
    )
    whole = Experiment(cfg)
    params, state = whole.initial_params, whole.strategy.init(whole.initial_params)
    for r in (1, 2):
        result = whole.driver.fit_round(r, params, state)
        params, state = result.params, result.state
    saved = checkpoint.Checkpoint(2, whole.checkpoint_tensors(params, state), {})
    assert any(k.endswith(features.FEDDYN_GRADIENT) for k in saved.tensors)
    assert float(saved.tensors["server." + FEDDYN_H].abs().sum()) > 0
    resumed = Experiment(cfg)
    p2, s2 = resumed.restore(saved)
    after_stop = resumed.driver.fit_round(3, p2, s2)
    straight = whole.driver.fit_round(3, params, state)
    assert torch.equal(after_stop.params, straight.params)
    assert whole.client_state.keys() == resumed.client_state.keys()
    for cid, named in whole.client_state.items():
        assert named.keys() == resumed.client_state[cid].keys()
        assert {features.FEDDYN_GRADIENT, features.FEDDYN_PENDING} <= named.keys()
        for name, value in named.items():
            assert torch.equal(value, resumed.client_state[cid][name]), (cid, name)


# ------------------------------------------------------ FedDyn: a reply that is not aggregated

M = 6  # the population of tiny_config
FEDDYN_SERVER = {
    "strategy": "feddyn",
    "feddyn_alpha": 0.2,
    "clients_per_round": 4,
    "min_clients": 3,
}


def _feddyn_rounds(faults: dict[tuple[int, int], FitFault], rounds: int = 3) -> list[dict]:
    """``rounds`` FedDyn rounds of 4 of 6 clients with ``faults`` injected (see
    :func:`conftest.faulted_rounds`)."""
    cfg = tiny_config(server=FEDDYN_SERVER, evaluation={"every": 0})
    return faulted_rounds(cfg, faults, rounds)


def _committed(after: dict, cid: int) -> torch.Tensor:
    """Client ``cid``'s ``g_k`` as the server's record settles it: the one ``h`` holds."""
    return committed_state(after, cid, features.FEDDYN_STATE)


@pytest.mark.parametrize("fault", [FitFault.LOST, FitFault.REJECTED])
def test_a_feddyn_reply_that_is_not_aggregated_leaves_the_client_as_if_it_never_trained(
    fault: FitFault,
) -> None:
    """Client ``k`` trains in round 1, then its reply is lost (or arrives with a NaN update and
    is rejected). Algorithm 1 keeps the ``g_k`` of a client outside ``P_t``, so the run equals
    the one where ``k``'s round-1 task never reached it: the same model, ``h`` and committed
    ``g_k`` for every client after every round (``k`` trains again in round 2 or 3, from its
    old ``g_k``), and ``h`` is the mean of the committed ``g_k`` over the population after every
    round, the paper's invariant."""
    plain = _feddyn_rounds({})
    first, later = plain[0]["sampled"], plain[1]["sampled"] + plain[2]["sampled"]
    k = next(c for c in first if c in later)  # its old g_k matters again in a later round
    faulted = _feddyn_rounds({(1, k): fault})
    never = _feddyn_rounds({(1, k): FitFault.UNREACHABLE})
    counted = "clients_failed" if fault is FitFault.LOST else "clients_rejected"
    assert faulted[0]["metrics"][counted] == 1 and faulted[0]["metrics"]["clients_completed"] == 3
    # after round 1, k has trained: its new g_k is pending, and the server's record settles it
    # to the one before (zero)
    one = faulted[0]
    assert one["clients"][k][features.FEDDYN_ROUNDS].tolist() == [0, 1]
    assert float(one["clients"][k][features.FEDDYN_PENDING].abs().sum()) > 0
    assert committed.last_aggregated(one["server"].aggregated, k) == 0
    assert float(_committed(one, k).abs().sum()) == 0
    for f, n in zip(faulted, never, strict=True):
        assert torch.equal(f["params"], n["params"])
        assert torch.equal(f["server"].h, n["server"].h)
        assert torch.equal(f["server"].aggregated, n["server"].aggregated)
        for cid in range(M):
            assert torch.equal(_committed(f, cid), _committed(n, cid)), cid
    for run in (faulted, never, plain):
        for after in run:
            mean_g = torch.stack([_committed(after, cid) for cid in range(M)]).mean(0)
            _assert_close(after["server"].h, mean_g, rtol=1e-5, atol=1e-7)
            assert float(after["server"].h.abs().sum()) > 0
    # and without the fault client k's round-1 update counts: the runs differ
    assert float((plain[-1]["params"] - faulted[-1]["params"]).abs().max()) > 1e-4


def test_a_feddyn_client_refuses_a_gradient_state_that_is_not_the_one_h_holds() -> None:
    """The server's record names a round the client's state does not hold (the state was lost,
    or is older or newer than the server's): the client refuses to train, saying so."""
    data = {0: ClientData(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]))}
    cfg: dict[str, messages.Scalar] = {"lr": 0.1, "batch_size": 2, features.FEDDYN_ALPHA: 0.5}
    start = [0.2, -0.1, 0.05, 0.0]
    app = ClientApp(_tiny_model(start), data)
    with pytest.raises(ValueError, match="holds this client's update of round 3"):
        app.fit(_task(start, {**cfg, features.FEDDYN_AGGREGATED: 3}, round_=4))
    first = app.fit(_task(start, {**cfg, features.FEDDYN_AGGREGATED: 0}, round_=4))
    assert app.state[0][features.FEDDYN_ROUNDS].tolist() == [0, 4]
    for told in (2, 5):  # neither the committed round (0) nor the pending one (4)
        with pytest.raises(ValueError, match=r"round 0 \(committed\) and 4 \(pending\)"):
            app.fit(_task(start, {**cfg, features.FEDDYN_AGGREGATED: told}, round_=6))
    # told that round 4 was not aggregated, the client answers it again from the same state
    again = app.fit(_task(start, {**cfg, features.FEDDYN_AGGREGATED: 0}, round_=4))
    assert torch.equal(again.update, first.update)
    # told that it was, it commits round 4's g_k before training in round 6
    pending = app.state[0][features.FEDDYN_PENDING]
    app.fit(_task(start, {**cfg, features.FEDDYN_AGGREGATED: 4}, round_=6))
    assert torch.equal(app.state[0][features.FEDDYN_GRADIENT], pending)
    assert app.state[0][features.FEDDYN_ROUNDS].tolist() == [4, 6]


def _task(params: list[float], cfg: dict[str, messages.Scalar], *, round_: int) -> messages.FitTask:
    return messages.FitTask(round_, 0, torch.tensor(params), {"seed": 1, **cfg}, {})


# ------------------------------------------------------------------------------ configuration


def _error(data: dict) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.validate(data)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"server": {"feddyn_alpha": 0.0}}, "server.feddyn_alpha: Input should be greater"),
        ({"server": {"feddyn_alpha": 0.1}}, "server.feddyn_alpha is only used"),
        ({"server": {"strategy": "feddyn", "server_lr": 0.5}}, "server.server_lr does not"),
        (
            {"server": {"strategy": "fednova"}, "client": {"optimizer": "adam"}},
            'server.strategy = "fednova" needs client.optimizer = "sgd"',
        ),
        (
            {
                "server": {"strategy": "fednova"},
                "secure_aggregation": {"enabled": True, "clip_norm": 1.0},
            },
            "secure_aggregation.enabled = true cannot run here: FedNova rescales",
        ),
        (
            {
                "server": {"strategy": "feddyn"},
                "secure_aggregation": {"enabled": True, "clip_norm": 1.0},
            },
            "secure_aggregation.enabled = true cannot run here: FedDyn's server state h",
        ),
        (
            {"server": {"strategy": "feddyn"}, "privacy": {"mode": "local", "noise_multiplier": 1}},
            'privacy.mode = "local" does not support server.strategy = "feddyn"',
        ),
        (
            {"server": {"strategy": "fednova", "mode": "async"}},
            'server.mode = "async" scales each update',
        ),
    ],
)
def test_combinations_that_make_no_sense_are_refused(data: dict, start: str) -> None:
    assert _error(data).startswith(start)


def test_robust_aggregators_are_refused() -> None:
    for kind in (StrategyKind.FEDDYN, StrategyKind.FEDNOVA):
        with pytest.raises(ValueError, match="averages the updates its own way"):
            fedopt.create(
                kind,
                client_config={},
                num_clients=4,
                robust_rule=robust.RobustConfig(robust.RobustAggregator.MEDIAN),
            )
