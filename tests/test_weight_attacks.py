"""A client's claimed example count and an absurd update cannot hijack a round.

A reply's ``num_examples`` is the client's own claim: robust rules weigh every update equally,
the mean caps each claim at the client's registered size, and claims that are not finite positive
numbers are rejected. Updates whose norm is absurd against the round's others are rejected, and a
round whose aggregate or server state is not finite leaves the model unchanged.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fedguard
from conftest import metric_rows, ten_iid_config
from fedguard.algorithms import robust
from fedguard.experiment import assembly, checkpoint
from fedguard.experiment.config import validate
from fedguard.models.adapter import TorchModel
from fedguard.protocol import fedopt, messages
from fedguard.protocol.driver import RoundDriver, claim_problem
from fedguard.protocol.strategy import StrategyKind
from fedguard.simulation.inprocess import InProcessTransport

LIAR = 4  # the client id that misbehaves in the whole-run tests


def _config(**sections: dict) -> dict:
    """Ten IID clients, all of them every round (as in the robust-run tests)."""
    return ten_iid_config("weights", **sections)


def _rewrite_fit_replies(monkeypatch, rewrite) -> None:
    """Every run's transport passes fit replies through ``rewrite(reply) -> reply``."""
    real = assembly.Experiment.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        honest = self.app.handle

        def handler(client_id: int, payload: bytes) -> bytes:
            out = honest(client_id, payload)
            if messages.kind_of(payload) != "FitTask":
                return out
            return messages.encode(rewrite(messages.decode(out, messages.FitReply)))

        self.driver.transport = InProcessTransport(handler, self.transport.client_ids)

    monkeypatch.setattr(assembly.Experiment, "__init__", init)


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> dict:
    """Clean FedAvg on the shared task: its accuracy and its clients' registered sizes."""
    out = tmp_path_factory.mktemp("control") / "run"
    summary = fedguard.run(_config(), out=out, progress=False)
    exp = assembly.Experiment(validate(_config()))
    sizes = {cid: d.num_train for cid, d in exp.fed.clients.items()}
    return {"accuracy": summary["test_accuracy"], "sizes": sizes}


# ---- (a) a client claiming 10^12 examples -------------------------------------------------------


@pytest.mark.parametrize("aggregator", ["mean", "geometric_median"])
def test_a_client_claiming_a_trillion_examples_does_not_take_over_the_run(
    aggregator, control, monkeypatch, tmp_path, caplog
) -> None:
    """The liar sends its update sign-flipped and tripled and claims 10^12 examples. Taken at
    face value the claim makes the aggregate its update (the mean walks backwards; the weighted
    geometric median is the heaviest point); capped or ignored, the run stays near the control."""

    def lie(reply: messages.FitReply) -> messages.FitReply:
        if reply.client_id != LIAR:
            return reply
        return messages.FitReply(
            reply.round, reply.client_id, -3.0 * reply.update, 10**12, reply.metrics
        )

    _rewrite_fit_replies(monkeypatch, lie)
    server = {} if aggregator == "mean" else {"aggregator": aggregator, "byzantine_f": 2}
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        summary = fedguard.run(_config(server=server), out=tmp_path / "r", progress=False)
    assert summary["status"] == "completed"
    assert control["accuracy"] >= 0.95
    assert summary["test_accuracy"] >= control["accuracy"] - 0.03, summary["test_accuracy"]
    rows = metric_rows(tmp_path / "r")
    assert [r["weights_capped"] for r in rows] == [1, 1, 1, 1]
    assert [r["clients_rejected"] for r in rows] == [0, 0, 0, 0]
    cap = control["sizes"][LIAR]
    assert f"client {LIAR} claims 1000000000000 examples, more than its registered {cap}" in (
        caplog.text
    )


def _fixed_clients(updates: dict[int, list[float]], claims: dict[int, object]):
    """A transport whose client ``c`` replies ``updates[c]`` claiming ``claims[c]`` examples."""

    def handler(client_id: int, payload: bytes) -> bytes:
        task = messages.decode(payload, messages.FitTask)
        update = torch.tensor(updates[client_id], dtype=torch.float32)
        reply = messages.FitReply(
            task.round, client_id, update, claims[client_id], {"train_loss": 1.0}
        )
        return messages.encode(reply)

    return InProcessTransport(handler, sorted(updates))


def _driver(updates, claims, *, registered=None, rule=None, kind=StrategyKind.FEDAVG, **kw):
    strategy = fedopt.create(kind, client_config={}, num_clients=len(updates), robust_rule=rule)
    return RoundDriver(
        _fixed_clients(updates, claims),
        strategy,
        dim=len(next(iter(updates.values()))),
        clients_per_round=len(updates),
        min_clients=1,
        seed=0,
        registered_examples=registered,
        **kw,
    )


# Two honest clients with 3 and 7 examples either side of the origin, and a liar far above them
# that holds 5 examples and claims 10^12.
HAND_UPDATES = {0: [-1.0, 0.0], 1: [1.0, 0.0], 2: [0.0, 100.0]}
HAND_CLAIMS = {0: 3, 1: 7, 2: 10**12}
HAND_REGISTERED = {0: 3, 1: 7, 2: 5}


def test_the_mean_caps_a_claim_at_the_registered_size_by_hand() -> None:
    driver = _driver(HAND_UPDATES, HAND_CLAIMS, registered=HAND_REGISTERED)
    params = torch.tensor([0.25, -0.5])
    result = driver.fit_round(1, params, driver.strategy.init(params))
    # (3 * (-1, 0) + 7 * (1, 0) + 5 * (0, 100)) / (3 + 7 + 5) = (4/15, 500/15)
    expected = [0.25 + 4.0 / 15.0, -0.5 + 500.0 / 15.0]
    assert result.params.tolist() == pytest.approx(expected, rel=1e-6)
    assert result.metrics["weights_capped"] == 1
    assert result.metrics["clients_rejected"] == 0
    # The training loss is weighted by the capped counts too: all three report 1.0.
    assert result.metrics["train_loss"] == pytest.approx(1.0)


def test_the_geometric_median_weighs_clients_equally_by_hand() -> None:
    """Equal weights: the geometric median of the triangle (-1, 0), (1, 0), (0, 100) is its Fermat
    point, where each side subtends 120 degrees: (0, 1/sqrt(3)). Weighted by the claims it would
    be the liar's (0, 100); weighted by the honest 3 and 7 it would lean towards (1, 0)."""
    rule = robust.RobustConfig(robust.RobustAggregator.GEOMETRIC_MEDIAN, f=1, tolerance=1e-10)
    for registered in (HAND_REGISTERED, None):  # with or without caps: the claims do not count
        driver = _driver(HAND_UPDATES, HAND_CLAIMS, registered=registered, rule=rule)
        params = torch.zeros(2)
        result = driver.fit_round(1, params, driver.strategy.init(params))
        assert result.params.tolist() == pytest.approx([0.0, 1.0 / math.sqrt(3.0)], abs=1e-5)


def test_every_robust_rule_ignores_the_claimed_weights() -> None:
    """Swapping the claims between clients changes nothing for a robust rule."""
    updates = {c: [float(c), float(c * c) - 3.0, 1.0 - c] for c in range(7)}
    claims_a = {c: 3 + 4 * c for c in range(7)}
    claims_b = {c: 10**9 if c == 6 else 11 - c for c in range(7)}
    for kind in robust.RobustAggregator:
        rule = robust.RobustConfig(kind, f=1, norm_bound=2.0, tau=1.5, multi_krum_m=3)
        out = []
        for claims in (claims_a, claims_b):
            driver = _driver(updates, claims, rule=rule)
            params = torch.zeros(3)
            out.append(driver.fit_round(1, params, driver.strategy.init(params)).params)
        assert torch.equal(out[0], out[1]), kind


@pytest.mark.parametrize("claim", [float("nan"), float("inf"), -3, 0, 10**400, "many", True])
def test_a_claim_that_is_no_positive_number_is_rejected_with_the_reason(claim, caplog) -> None:
    """Whichever check catches it first (the message schema or the driver's own), the reply is
    rejected with a reason that names ``num_examples``, and the round goes on without it."""
    updates = {0: [1.0, 2.0], 1: [3.0, -1.0], 2: [0.5, 0.5]}
    driver = _driver(updates, {0: 3, 1: claim, 2: 7}, registered={0: 3, 1: 5, 2: 7})
    params = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        result = driver.fit_round(1, params, driver.strategy.init(params))
    reason = dict(result.problems)[1]
    assert reason.startswith("rejected: ") and "num_examples" in reason
    assert f"client 1 {reason}" in caplog.text
    assert result.metrics["clients_rejected"] == 1
    expected = [(3 * 1.0 + 7 * 0.5) / 10, (3 * 2.0 + 7 * 0.5) / 10]
    assert result.params.tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        (float("nan"), "num_examples must be positive and finite, got nan"),
        (-3.0, "num_examples must be positive and finite, got -3"),
        (10**400, "num_examples must be positive and finite, got inf"),
        ("many", "num_examples must be a number, got 'many'"),
        (True, "num_examples must be a number, got True"),
    ],
)
def test_the_driver_refuses_a_claim_that_is_no_positive_number(claim, reason) -> None:
    """The driver's own check, for a reply that reached it without the message schema."""
    assert claim_problem(claim) == reason


def test_a_client_without_a_registered_size_is_rejected() -> None:
    updates = {0: [1.0], 1: [2.0], 2: [4.0]}
    driver = _driver(updates, {0: 3, 1: 7, 2: 11}, registered={0: 3, 1: 7})
    params = torch.zeros(1)
    result = driver.fit_round(1, params, driver.strategy.init(params))
    assert dict(result.problems)[2] == "rejected: client 2 has no registered example count"
    assert result.params.tolist() == pytest.approx([(3 * 1.0 + 7 * 2.0) / 10])


# ---- (b) one finite 3e38 update ----------------------------------------------------------------


def test_one_finite_3e38_update_is_rejected_and_the_run_completes(
    control, monkeypatch, tmp_path
) -> None:
    def overflow(reply: messages.FitReply) -> messages.FitReply:
        if reply.client_id != LIAR:
            return reply
        huge = torch.full_like(reply.update, 3e38)
        assert torch.isfinite(huge).all()
        return messages.FitReply(reply.round, LIAR, huge, reply.num_examples, reply.metrics)

    _rewrite_fit_replies(monkeypatch, overflow)
    summary = fedguard.run(_config(), out=tmp_path / "r", progress=False)
    assert summary["status"] == "completed"
    rows = metric_rows(tmp_path / "r")
    assert [r["clients_rejected"] for r in rows] == [1, 1, 1, 1]
    assert [r["clients_completed"] for r in rows] == [9, 9, 9, 9]
    assert all(r["aggregate_rejected"] is None for r in rows)
    assert summary["clients_rejected"] == 4
    params = checkpoint.latest(tmp_path / "r" / "checkpoints").tensors["params"]
    assert torch.isfinite(params).all() and float(params.abs().max()) < 100.0
    assert summary["test_accuracy"] >= control["accuracy"] - 0.03
    log = (tmp_path / "r" / "run.log").read_text()
    assert f"client {LIAR} rejected: update norm" in log
    assert "times the round's median update norm" in log


def test_the_norm_bound_leaves_boosted_and_flipped_updates_to_the_rule() -> None:
    """10x boosts and 10x sign flips (the benchmarks' attacks) pass; 2e4 times the median does
    not; tiny updates from a minority cannot pull the median under the honest norms."""
    honest = {c: [1.0 + 0.1 * c, -0.5] for c in range(5)}
    updates = {**honest, 5: [10.0, -5.0], 6: [-10.0, 5.0], 7: [2e4, 0.0]}
    driver = _driver(updates, dict.fromkeys(updates, 3))
    params = torch.zeros(2)
    result = driver.fit_round(1, params, driver.strategy.init(params))
    assert [c for c, _ in result.problems] == [7]
    assert result.metrics["clients_rejected"] == 1 and result.metrics["clients_completed"] == 7
    kept = [updates[c] for c in range(7)]
    assert result.params.tolist() == pytest.approx([sum(u[i] for u in kept) / 7 for i in (0, 1)])
    # Three tiny updates among four honest ones: the lower median is still an honest norm.
    quiet = {**{c: [1.0, 1.0] for c in range(4)}, **{c: [1e-12, 0.0] for c in range(4, 7)}}
    driver = _driver(quiet, dict.fromkeys(quiet, 3))
    assert driver.fit_round(1, params, driver.strategy.init(params)).problems == []
    # Two replies: the lower median is the smaller norm, so the 3e38 one cannot vouch for itself
    # (the midpoint of the two norms would).
    pair = {0: [1.0, 0.0], 1: [3e38, 0.0]}
    driver = _driver(pair, dict.fromkeys(pair, 3))
    assert [c for c, _ in driver.fit_round(1, params, driver.strategy.init(params)).problems] == [1]
    with pytest.raises(ValueError, match="max_norm_ratio must be above 1"):
        _driver(quiet, dict.fromkeys(quiet, 3), max_norm_ratio=0.5)


# ---- non-finite aggregates ---------------------------------------------------------------------


def test_a_non_finite_aggregate_leaves_the_model_unchanged_and_says_why(caplog) -> None:
    updates = {c: [3e38, -1.0] for c in range(3)}  # equal norms: no update is absurd
    driver = _driver(updates, {0: 3, 1: 7, 2: 11})
    params = torch.tensor([3e38, 0.5])  # + 3e38 overflows float32
    state = driver.strategy.init(params)
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        result = driver.fit_round(1, params, state)
    assert torch.equal(result.params, params) and result.state is state
    assert result.metrics["aggregate_rejected"] == "the aggregate is not finite"
    assert result.metrics["clients_rejected"] == 0
    assert "round 1: the aggregate is not finite; the model is unchanged" in caplog.text


def test_a_round_whose_server_state_overflows_is_skipped_and_the_run_goes_on(
    monkeypatch, tmp_path
) -> None:
    """Round 2: every client sends 1e20 per coordinate (equal norms, so none is absurd); FedAdam's
    second moment squares that to infinity. Kept, it would freeze the model for good (every later
    step divides by infinity); skipped, the run goes on from round 1's model."""

    def blow_up(reply: messages.FitReply) -> messages.FitReply:
        if reply.round != 2:
            return reply
        big = torch.full_like(reply.update, 1e20)
        return messages.FitReply(2, reply.client_id, big, reply.num_examples, reply.metrics)

    server = {"strategy": "fedadam", "server_lr": 0.05}
    _rewrite_fit_replies(monkeypatch, blow_up)
    summary = fedguard.run(
        _config(experiment={"rounds": 5}, server=server), out=tmp_path / "r", progress=False
    )
    assert summary["status"] == "completed" and summary["rounds_completed"] == 5
    rows = metric_rows(tmp_path / "r")
    assert rows[1]["aggregate_rejected"] == "the new server state 'optimizer.v' is not finite"
    assert [r["aggregate_rejected"] for r in rows[:1] + rows[2:]] == [None] * 4
    last = checkpoint.latest(tmp_path / "r" / "checkpoints").tensors
    assert torch.isfinite(last["server.optimizer.v"]).all()
    assert summary["test_accuracy"] >= 0.9
    # Stopped after round 2, the model and state are those of a run stopped after round 1.
    for rounds in (1, 2):
        cfg = _config(experiment={"rounds": rounds}, server=server)
        fedguard.run(cfg, out=tmp_path / f"after_{rounds}", progress=False)
    one, two = (checkpoint.latest(tmp_path / f"after_{r}" / "checkpoints").tensors for r in (1, 2))
    assert torch.equal(one["params"], two["params"])
    assert torch.equal(one["server.optimizer.v"], two["server.optimizer.v"])
    assert not torch.equal(last["params"], two["params"])  # training went on after round 2


# ---- (c) FedAvg with unequal weights, by hand, through the driver -------------------------------


def test_fedavg_through_the_driver_is_the_example_weighted_mean_by_hand() -> None:
    updates = {0: [1.0, -2.0, 0.5], 1: [4.0, 0.0, -1.0], 2: [-2.0, 6.0, 3.0]}
    claims = {0: 3, 1: 7, 2: 11}
    driver = _driver(updates, claims, registered={0: 3, 1: 7, 2: 11})
    params = torch.tensor([0.5, 0.25, -1.0])
    result = driver.fit_round(1, params, driver.strategy.init(params))
    # (3 u0 + 7 u1 + 11 u2) / 21, coordinate by coordinate
    delta = [
        (3 * 1.0 + 7 * 4.0 + 11 * -2.0) / 21,  # 9 / 21
        (3 * -2.0 + 7 * 0.0 + 11 * 6.0) / 21,  # 60 / 21
        (3 * 0.5 + 7 * -1.0 + 11 * 3.0) / 21,  # 27.5 / 21
    ]
    expected = [p + d for p, d in zip([0.5, 0.25, -1.0], delta, strict=True)]
    assert result.params.tolist() == pytest.approx(expected, rel=1e-6)
    assert result.metrics["weights_capped"] == 0


def test_a_model_with_non_finite_outputs_is_reported_not_fatal() -> None:
    """A finite but absurd global model (weights of magnitude 3e38, as after a majority of huge
    equal updates under the plain mean) gives NaN probabilities: its metrics say so (no AUC, a
    non-finite loss) instead of ending the run in the evaluation."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LogSoftmax(dim=1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)
        model[0].weight[1].fill_(-3e38)
    adapter = TorchModel(model)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.75, -1.5], [2.0, 2.0, 2.0], [-1.0, 0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 0])
    metrics = assembly.central_metrics(adapter, x, y, batch_size=3)
    assert metrics["test_auc"] is None
    assert not math.isfinite(metrics["test_loss"])
    # a sane model on the same data: the class-1 score rises with x[2], which ranks one of the
    # four (positive, negative) pairs right, so AUC 1/4; the None above is the guard
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0, -0.5], [0.0, 0.0, 0.5]]))
        model[0].bias.zero_()
    sane = assembly.central_metrics(adapter, x, y, batch_size=3)
    assert sane["test_auc"] == pytest.approx(0.25)
