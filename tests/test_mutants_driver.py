"""The round driver's seeded sampling and seeds, pinned to their documented streams (found by
mutation testing): a resumed or deployed run must draw exactly what the simulator drew."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fedguard.protocol import driver, messages, secagg, secagg_client
from fedguard.protocol.strategy import Strategy
from fedguard.protocol.transport import Delivered, Failed, FailureKind, Transport
from fedguard.simulation.inprocess import InProcessTransport


def test_client_and_graph_seeds_are_31_bit_seed_sequence_words() -> None:
    for seed, round_, cid in ((0, 1, 2), (123, 45, 678), (2**40, 3, 9)):
        word = int(np.random.SeedSequence([seed, round_, cid]).generate_state(1)[0])
        assert driver.client_seed(seed, round_, cid) == word // 2
        gword = int(np.random.SeedSequence([seed, round_, 0x6A5]).generate_state(1)[0])
        assert driver.graph_seed(seed, round_) == gword // 2
    seeds = [driver.client_seed(7, 1, c) for c in range(200)]
    assert all(0 <= s < 2**31 for s in seeds) and max(seeds) >= 2**30
    assert driver.graph_seed(7, 1) != driver.graph_seed(7, 2)


def test_poisson_sample_uses_its_own_stream_in_ascending_order() -> None:
    ids = [9, 3, 7, 1, 5, 11, 13, 0]
    u = np.random.default_rng([4, 2, 0x5A4D]).random(len(ids))
    expected = [c for c, x in zip(sorted(ids), u, strict=True) if x < 0.4]
    assert driver.poisson_sample(ids, 0.4, seed=4, round_=2) == expected
    assert driver.poisson_sample(ids, 1.0, seed=4, round_=2) == sorted(ids)
    assert driver.poisson_sample(ids, 0.0, seed=4, round_=2) == []
    many = driver.poisson_sample(list(range(20_000)), 0.25, seed=1, round_=1)
    assert len(many) == pytest.approx(5000, abs=250)


def test_sample_clients_is_a_seeded_choice_without_replacement() -> None:
    ids = [10, 20, 30, 40, 50, 60]
    rng = np.random.default_rng([5, 3, 0x5A])
    expected = sorted(int(c) for c in rng.choice(np.asarray(ids), size=3, replace=False))
    got = driver.sample_clients(ids, 3, seed=5, round_=3)
    assert got == expected and all(isinstance(c, int) for c in got)
    assert driver.sample_clients(ids, 6, seed=5, round_=3) == ids  # everyone, once
    assert driver.sample_clients(ids, 0, seed=5, round_=3) == []
    with pytest.raises(ValueError, match="Cannot sample 7 clients from 6"):
        driver.sample_clients(ids, 7, seed=5, round_=3)
    rounds = {tuple(driver.sample_clients(list(range(100)), 5, seed=5, round_=r)) for r in range(5)}
    assert len(rounds) == 5


# --- The round driver against scripted clients (no model, no training): what it sends, counts,
# rejects, caps and hands to the strategy, pinned with hand-computed numbers. A stub strategy
# records what it is given; every weight is an unequal count, never 1.

DIM = 3
PARAMS = torch.tensor([0.5, -1.0, 2.0])
CONFIG = {"lr": 0.25, "local_steps": 3}
EXTRA = torch.tensor([1.5, -2.0])


class _Recorder(Strategy):
    """Records what the driver hands over; returns ``params + step`` and ``state_out``."""

    def __init__(self, required: dict[str, int] | None = None) -> None:
        self.required = required or {}
        self.calls: list[tuple] = []
        self.sums: list[tuple] = []
        self.instructed: list = []
        self.step = torch.tensor([1.0, 2.0, -3.0])
        self.state_out: dict[str, torch.Tensor] = {"m": torch.tensor([0.25, 0.5, 0.75])}

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def fit_instructions(self, state):
        self.instructed.append(state)
        return dict(CONFIG), {"extra": EXTRA}

    def aggregate(self, state, params, replies, *, round_=0):
        self.calls.append((state, params, list(replies), round_))
        return self.state_out, params + self.step

    def aggregate_sum(self, state, params, total, weight, *, round_=0):
        self.sums.append((state, params, total, weight, round_))
        return self.state_out, params + self.step

    def required_tensors(self, dim: int) -> dict[str, int]:
        return {name: dim if n is None else n for name, n in self.required.items()}


class _NoSum(_Recorder):
    """A strategy without aggregate_sum: secure aggregation must refuse it."""

    aggregate_sum = Strategy.aggregate_sum


class _Scripted(Transport):
    """Answers each request with ``answer(client_id, payload)``; records what it was sent."""

    def __init__(self, ids, answer) -> None:
        self._ids = tuple(ids)
        self.answer = answer
        self.deadlines: list[float | None] = []
        self.sent: dict[int, bytes] = {}

    @property
    def client_ids(self):
        return self._ids

    def exchange(self, requests, *, deadline_s):
        self.deadlines.append(deadline_s)
        outcomes = []
        for cid in requests:
            self.sent[cid] = requests[cid]
            outcomes.append(self.answer(cid, requests[cid]))
        return outcomes


def _fit_reply(cid, update, n, *, round_=3, metrics=None, tensors=None) -> Delivered:
    reply = messages.FitReply(
        round_, cid, torch.as_tensor(update, dtype=torch.float32), n, metrics or {}, tensors or {}
    )
    return Delivered(cid, messages.encode(reply), 0.1)


def _driver(answers, ids=None, strategy=None, **kwargs):
    ids = sorted(answers) if ids is None else ids
    transport = _Scripted(ids, lambda cid, payload: answers[cid])
    kwargs.setdefault("clients_per_round", len(ids))
    kwargs.setdefault("min_clients", 1)
    strategy = strategy or _Recorder()
    d = driver.RoundDriver(transport, strategy, dim=DIM, seed=11, **kwargs)
    return d, transport, strategy


def test_fit_round_sends_counts_caps_and_hands_over_the_accepted_replies() -> None:
    junk = Delivered(6, b"\x00junk", 0.1)
    answers = {
        2: _fit_reply(2, [1.0, 2.0, 2.0], 30, metrics={"train_loss": 2.0, "dp_steps": 3.0}),
        4: Failed(4, FailureKind.TIMEOUT, "slow"),
        6: junk,
        8: _fit_reply(8, [0.0, 3.0, 4.0], 10, metrics={"train_loss": 4.0}),
        10: _fit_reply(10, [2.0, -1.0, 2.0], 50, metrics={"train_loss": 1.0}),
        12: _fit_reply(12, [1.0, 1.0, 1.0], 70, metrics={"train_loss": 3.0}),
        14: Failed(14, FailureKind.ERROR, "RuntimeError: disk full"),
    }
    registered = {2: 40, 4: 40, 6: 40, 8: 40, 10: 25, 12: 60, 14: 40}
    d, transport, strategy = _driver(
        answers, min_clients=2, deadline_s=7.5, registered_examples=registered
    )
    state = {"s": torch.tensor([9.0])}
    result = d.fit_round(3, PARAMS, state)

    assert transport.deadlines == [7.5]
    expected_tasks = {
        cid: messages.encode(
            messages.FitTask(
                3, cid, PARAMS, {**CONFIG, "seed": driver.client_seed(11, 3, cid)}, {"extra": EXTRA}
            )
        )
        for cid in (2, 4, 6, 8, 10, 12, 14)
    }
    assert transport.sent == expected_tasks
    task = messages.decode(transport.sent[8], messages.FitTask)
    assert task.config["seed"] == driver.client_seed(11, 3, 8) != driver.client_seed(11, 3, 2)
    try:
        messages.decode(junk.payload, messages.FitReply)
    except messages.MessageError as exc:
        malformed = str(exc)
    assert result.problems == [
        (4, "timeout: slow"),
        (6, f"rejected: {malformed}"),
        (14, "error: RuntimeError: disk full"),
    ]
    delivered = [a.payload for a in answers.values() if isinstance(a, Delivered)]
    assert result.metrics == {
        "clients_sampled": 7,
        "clients_completed": 4,
        "clients_failed": 2,
        "clients_rejected": 1,
        "weights_capped": 2,
        "bytes_up": sum(len(p) for p in delivered),
        "bytes_down": sum(len(p) for p in expected_tasks.values()),
        "aggregate_rejected": None,
        # weighted by the capped counts 30, 10, 25 and 60
        "train_loss": (2.0 * 30 + 4.0 * 10 + 1.0 * 25 + 3.0 * 60) / 125,
    }
    assert strategy.instructed == [state] and strategy.instructed[0] is state
    got_state, got_params, replies, round_ = strategy.calls[0]
    assert got_state is state and got_params is PARAMS and round_ == 3
    assert [(r.client_id, r.num_examples) for r in replies] == [
        (2, 30),
        (8, 10),
        (10, 25),
        (12, 60),
    ]
    assert torch.equal(replies[2].update, torch.tensor([2.0, -1.0, 2.0]))
    assert torch.equal(result.params, PARAMS + strategy.step)
    assert result.state is strategy.state_out
    assert result.sampled == [2, 4, 6, 8, 10, 12, 14]
    # what each accepted client reported, before its weight was cut
    assert result.reported == {
        2: {"train_loss": 2.0, "dp_steps": 3.0},
        8: {"train_loss": 4.0},
        10: {"train_loss": 1.0},
        12: {"train_loss": 3.0},
    }
    # an accepted reply comes with no reason
    reply, reason = d._check_fit_reply(answers[8], 3)
    assert reason == "" and reply is not None and reply.client_id == 8


def test_a_claim_at_the_registered_size_is_not_capped_and_without_registry_nothing_is() -> None:
    answers = {1: _fit_reply(1, [1.0, 0.0, 0.0], 40), 2: _fit_reply(2, [0.0, 1.0, 0.0], 41)}
    d, _, strategy = _driver(answers, registered_examples={1: 40, 2: 40})
    result = d.fit_round(3, PARAMS, {})
    assert [r.num_examples for r in strategy.calls[0][2]] == [40, 40]
    assert result.metrics["weights_capped"] == 1
    d, _, strategy = _driver(answers)
    assert d.fit_round(3, PARAMS, {}).metrics["weights_capped"] == 0
    assert [r.num_examples for r in strategy.calls[0][2]] == [40, 41]


def test_every_reply_check_names_its_reason() -> None:
    good = torch.ones(DIM)
    answers = {
        0: _fit_reply(0, [1.0, 0.0, 0.0], 5, tensors={"control": good}),
        1: _fit_reply(1, [1.0, 0.0, 0.0, 0.0], 5, tensors={"control": good}),
        2: _fit_reply(2, [1.0, math.nan, 0.0], 5, tensors={"control": good}),
        3: _fit_reply(3, [1.0, 0.0, 0.0], 0, tensors={"control": good}),
        4: _fit_reply(4, [1.0, 0.0, 0.0], 5, tensors={"control": good}),  # not registered
        5: _fit_reply(5, [1.0, 0.0, 0.0], 5),
        6: _fit_reply(6, [1.0, 0.0, 0.0], 5, tensors={"control": torch.ones(2)}),
        7: _fit_reply(7, [1.0, 0.0, 0.0], 5, tensors={"control": torch.tensor([1, math.inf, 1])}),
        8: _fit_reply(8, [1.0, 0.0, 0.0], 5, tensors={"control": good}, metrics={"sigma": 0.5}),
        9: _fit_reply(9, [1.0, 0.0, 0.0], 5, tensors={"control": good}, round_=2),
        11: Delivered(11, messages.encode(messages.EvaluateReply(3, 11, 5, {"loss": 1.0})), 0.1),
        10: _fit_reply(10, [0.0, 2.0, 0.0], 7, tensors={"control": good}, metrics={"sigma": 1.5}),
    }
    checked = []

    def reply_check(reply: messages.FitReply) -> str | None:
        checked.append(reply.client_id)
        return "noise below the plan" if reply.metrics.get("sigma") == 0.5 else None

    registered = {c: 9 for c in answers if c != 4}
    try:
        messages.decode(answers[11].payload, messages.FitReply)
    except messages.MessageError as exc:
        wrong_kind = str(exc)
    assert "FitReply" in wrong_kind
    d, _, strategy = _driver(
        answers,
        strategy=_Recorder(required={"control": None}),
        registered_examples=registered,
        reply_check=reply_check,
    )
    result = d.fit_round(3, PARAMS, {})
    reasons = dict(result.problems)
    assert reasons == {
        1: "rejected: update has shape (4,), expected (3,)",
        2: "rejected: update contains NaN or infinite values",
        3: "rejected: num_examples must be positive and finite, got 0",
        4: "rejected: client 4 has no registered example count",
        5: "rejected: reply lacks the 'control' tensor",
        6: "rejected: 'control' has shape (2,), expected (3,)",
        7: "rejected: 'control' contains NaN or infinite values",
        8: "rejected: noise below the plan",
        9: "rejected: reply is for client 9 round 2, expected client 9 round 3",
        11: f"rejected: {wrong_kind}",
    }
    assert [r.client_id for r in strategy.calls[0][2]] == [0, 10]
    assert checked == [0, 8, 10]  # the plan's check comes after the driver's own
    assert result.metrics["clients_rejected"] == 10
    assert result.metrics["clients_completed"] == 2


def _norm_round(norms_updates, ratio):
    answers = {cid: _fit_reply(cid, update, 4 + cid) for cid, update in enumerate(norms_updates)}
    d, _, strategy = _driver(answers, max_norm_ratio=ratio)
    result = d.fit_round(3, PARAMS, {})
    return [r.client_id for r in strategy.calls[0][2]], dict(result.problems), result.metrics


def test_absurd_norms_are_judged_against_the_lower_median() -> None:
    # norms 1, 2, 7, 100: the lower median is 2, the bound 3 * 2 = 6 (the upper median 7 would
    # keep client 2)
    kept, reasons, metrics = _norm_round(
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 7.0], [100.0, 0.0, 0.0]], 3.0
    )
    assert kept == [0, 1]
    assert reasons == {
        2: "rejected: update norm 7 is more than 3 times the round's median update norm 2",
        3: "rejected: update norm 100 is more than 3 times the round's median update norm 2",
    }
    assert metrics["clients_rejected"] == 2 and metrics["clients_completed"] == 2
    # three norms 1, 2, 15: the median is the middle one, 2 (not the lowest): all pass ratio 10
    assert _norm_round([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 15.0]], 10.0)[:2] == (
        [0, 1, 2],
        {},
    )
    # a norm exactly at the bound passes; two replies are judged too
    assert _norm_round([[2.0, 0.0, 0.0], [0.0, 6.0, 0.0]], 3.0)[:2] == ([0, 1], {})
    assert _norm_round([[1.0, 0.0, 0.0], [0.0, 3.5, 0.0]], 3.0)[0] == [0]
    # the norm is taken in float64: a finite float32 update whose float32 norm overflows
    kept, reasons, _ = _norm_round([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3e38, 3e38, 0.0]], 10.0)
    assert kept == [0, 1]
    assert reasons[2] == (
        "rejected: update norm 4.24e+38 is more than 10 times the round's median update norm 1"
    )
    # a median of zero bounds nothing, nor does an infinite ratio, nor a lone reply
    assert _norm_round([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], 3.0)[0] == [0, 1, 2]
    assert _norm_round([[1.0, 0.0, 0.0], [1e30, 0.0, 0.0]], math.inf)[0] == [0, 1]
    assert _norm_round([[1e30, 0.0, 0.0]], 3.0)[0] == [0]


def test_the_hook_before_aggregation_and_the_min_clients_count_after_it() -> None:
    answers = {c: _fit_reply(c, [float(c), 1.0, 0.0], 3 + c) for c in (1, 2, 3)}
    seen = []

    def hook(round_, params, state, accepted):
        seen.append((round_, params, state, [r.client_id for r in accepted]))
        return accepted[1:], {"contribution": 0.5}

    d, _, strategy = _driver(answers, min_clients=2, before_aggregate=hook)
    state = {"s": torch.tensor([2.0])}
    result = d.fit_round(3, PARAMS, state)
    assert seen == [(3, PARAMS, state, [1, 2, 3])]
    assert [r.client_id for r in strategy.calls[0][2]] == [2, 3]
    assert result.metrics["contribution"] == 0.5
    assert result.metrics["clients_completed"] == 2
    d, _, _ = _driver(answers, min_clients=3, before_aggregate=hook)
    with pytest.raises(driver.RoundFailedError, match="only 2 usable replies of 3 sampled"):
        d.fit_round(3, PARAMS, state)
    # no accepted reply: the hook is not asked, the round fails with every client's problem
    failing = {c: Failed(c, FailureKind.ERROR, f"boom {c}") for c in (1, 2)}
    d, _, _ = _driver(failing, before_aggregate=hook)
    seen.clear()
    with pytest.raises(driver.RoundFailedError) as info:
        d.fit_round(3, PARAMS, state)
    assert seen == []
    assert str(info.value) == (
        "Round 3: only 0 usable replies of 2 sampled, min_clients is 1. Problems: "
        "client 1: error: boom 1; client 2: error: boom 2"
    )


def test_a_non_finite_aggregate_or_state_leaves_the_model_unchanged() -> None:
    answers = {c: _fit_reply(c, [1.0, 0.0, 0.0], 3 + c) for c in (1, 2)}
    state = {"s": torch.tensor([2.0])}
    d, _, strategy = _driver(answers)
    strategy.step = torch.tensor([0.0, math.nan, 0.0])
    result = d.fit_round(3, PARAMS, state)
    assert result.metrics["aggregate_rejected"] == "the aggregate is not finite"
    assert result.params is PARAMS and result.state is state
    d, _, strategy = _driver(answers)
    strategy.state_out = {"empty": torch.zeros(0), "m": torch.tensor([1.0, math.inf])}
    result = d.fit_round(3, PARAMS, state)
    assert result.metrics["aggregate_rejected"] == "the new server state 'm' is not finite"
    assert result.params is PARAMS and result.state is state
    d, _, strategy = _driver(answers)
    strategy.state_out = {"empty": torch.zeros(0), "m": torch.tensor([1.0, 2.0])}
    result = d.fit_round(3, PARAMS, state)
    assert result.metrics["aggregate_rejected"] is None and result.state is strategy.state_out
    assert torch.equal(result.params, PARAMS + strategy.step)


def test_train_loss_skips_clients_without_a_finite_loss() -> None:
    answers = {
        1: _fit_reply(1, [1.0, 0.0, 0.0], 6, metrics={"train_loss": 3.0}),
        2: _fit_reply(2, [1.0, 0.0, 0.0], 9, metrics={"train_loss": math.nan}),
        3: _fit_reply(3, [1.0, 0.0, 0.0], 12),
        4: _fit_reply(4, [1.0, 0.0, 0.0], 2, metrics={"train_loss": 0.5}),
    }
    d, _, _ = _driver(answers)
    assert d.fit_round(3, PARAMS, {}).metrics["train_loss"] == (3.0 * 6 + 0.5 * 2) / 8
    d, _, _ = _driver({c: answers[c] for c in (2, 3)})
    assert d.fit_round(3, PARAMS, {}).metrics["train_loss"] is None


def test_sampling_fixed_size_or_poisson_at_the_expected_rate() -> None:
    ids = [3, 5, 7, 9, 11, 13, 15, 17]
    answers = {c: _fit_reply(c, [1.0, 0.0, 0.0], 5) for c in ids}
    d, _, _ = _driver(answers, ids=ids, clients_per_round=3)
    for r in (1, 2, 3):
        assert d.sample(r) == driver.sample_clients(ids, 3, seed=11, round_=r)
    assert len(d.sample(1)) == 3
    d, _, _ = _driver(answers, ids=ids, clients_per_round=3, poisson=True)
    assert [d.sample(r) for r in range(1, 9)] == [
        driver.poisson_sample(ids, 3 / 8, seed=11, round_=r) for r in range(1, 9)
    ]
    answers = {c: _fit_reply(c, [1.0, 0.0, 0.0], 5, round_=4) for c in ids}
    d, transport, _ = _driver(answers, ids=ids, clients_per_round=3, poisson=True)
    result = d.fit_round(4, PARAMS, {})
    assert result.sampled == driver.poisson_sample(ids, 3 / 8, seed=11, round_=4)
    assert sorted(transport.sent) == result.sampled


def test_the_driver_refuses_impossible_settings() -> None:
    answers = {c: _fit_reply(c, [1.0, 0.0, 0.0], 5) for c in range(4)}
    for cpr, low in ((2, 0), (2, 3), (5, 1)):
        with pytest.raises(ValueError, match=r"Need 1 <= min_clients"):
            _driver(answers, clients_per_round=cpr, min_clients=low)
    for cpr, low in ((4, 1), (2, 2), (1, 1)):
        assert _driver(answers, clients_per_round=cpr, min_clients=low)[0].min_clients == low
    with pytest.raises(ValueError, match="max_norm_ratio must be above 1, got 1.0"):
        _driver(answers, max_norm_ratio=1.0)
    assert _driver(answers, max_norm_ratio=1.5)[0].max_norm_ratio == 1.5
    assert _driver(answers)[0].max_norm_ratio == driver.MAX_NORM_RATIO == 1e4
    with pytest.raises(ValueError, match=r"positive numbers, got \{1: 0, 3: True\}"):
        _driver(answers, registered_examples={0: 5, 1: 0, 2: 2.5, 3: True})
    registry = {0: 5, 1: 6}
    d = _driver(answers, registered_examples=registry)[0]
    registry[0] = 1000  # the driver keeps its own copy
    assert d.registered_examples == {0: 5, 1: 6}
    assert _driver(answers)[0].registered_examples is None
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    with pytest.raises(ValueError, match="cannot serve this strategy: _NoSum does not implement"):
        _driver(answers, strategy=_NoSum(), secure_aggregation=settings)
    assert _driver(answers, secure_aggregation=settings)[0].secure_aggregation is settings


def test_claim_problem_accepts_finite_positive_numbers_only() -> None:
    assert driver.claim_problem(3) is None and driver.claim_problem(0.25) is None
    assert driver.claim_problem(True) == "num_examples must be a number, got True"
    assert driver.claim_problem("7") == "num_examples must be a number, got '7'"
    assert driver.claim_problem(None) == "num_examples must be a number, got None"
    assert driver.claim_problem(0) == "num_examples must be positive and finite, got 0"
    assert driver.claim_problem(-2.5) == "num_examples must be positive and finite, got -2.5"
    assert driver.claim_problem(math.nan) == "num_examples must be positive and finite, got nan"
    assert driver.claim_problem(10**400) == "num_examples must be positive and finite, got inf"
    assert driver.claim_problem(10**300) is None


def test_requests_encode_on_read_and_count_each_client_once() -> None:
    made = []

    def encode(cid: int) -> bytes:
        made.append(cid)
        return b"x" * (10 + cid)

    requests = driver._Requests([5, 2, 9], encode)
    assert list(requests) == [5, 2, 9] and len(requests) == 3 and made == []
    assert requests[2] == b"x" * 12 and requests[2] == b"x" * 12
    assert requests.bytes_sent == 12 and made == [2, 2]
    assert requests[9] == b"x" * 19 and requests.bytes_sent == 31
    with pytest.raises(KeyError):
        requests[7]
    assert made == [2, 2, 9]


# --- federated evaluation


def _eval_reply(cid, n, loss, acc, *, round_=3, tensors=None) -> Delivered:
    reply = messages.EvaluateReply(round_, cid, n, {"loss": loss, "accuracy": acc}, tensors or {})
    return Delivered(cid, messages.encode(reply), 0.1)


def test_evaluation_weights_replies_by_their_capped_counts(caplog) -> None:
    answers = {
        1: _eval_reply(1, 8, 0.25, 0.9),
        2: _eval_reply(2, 10, 0.5, 0.8),
        3: _eval_reply(3, 30, 1.5, 0.6),
        4: Failed(4, FailureKind.ERROR, "down"),
        5: _eval_reply(5, 5, math.nan, 0.5),
        6: _eval_reply(6, 1, 2.0, 1.0),
        7: _eval_reply(7, 4, 9.0, 0.0),  # not asked
    }
    d, transport, _ = _driver(answers, deadline_s=2.5)
    registered = {2: 10, 3: 20, 4: 5, 5: 5, 6: 3}  # 1 has none: weight 0, not counted
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        got = d.evaluate_round(3, PARAMS, clients=[1, 2, 3, 4, 5, 6], registered=registered)
    assert sorted(transport.sent) == [1, 2, 3, 4, 5, 6] and transport.deadlines == [2.5]
    task = messages.decode(transport.sent[2], messages.EvaluateTask)
    assert (task.round, task.client_id, task.config) == (3, 2, {})
    assert torch.equal(task.parameters, PARAMS)
    assert got == driver.FederatedEvaluation(
        loss=(0.5 * 10 + 1.5 * 20 + 2.0 * 1) / 31,
        accuracy=(0.8 * 10 + 0.6 * 20 + 1.0 * 1) / 31,
        auc=None,
        confusion=None,
        clients=3,
        examples=31.0,
    )
    # the cut is logged for the clients that claimed more than their registered count only
    cuts = [r.getMessage() for r in caplog.records if "more than its registered" in r.getMessage()]
    assert cuts == [
        "round 3: client 1 evaluated 8 examples, more than its registered 0.0; weighted as 0.0",
        "round 3: client 3 evaluated 30 examples, more than its registered 20.0; weighted as 20.0",
    ]
    # without a registry every reply weighs its own count; by default every client is asked
    got = d.evaluate_round(3, PARAMS)
    assert sorted(transport.sent) == [1, 2, 3, 4, 5, 6, 7]
    assert got.loss == pytest.approx((0.25 * 8 + 0.5 * 10 + 1.5 * 30 + 2.0 + 9.0 * 4) / 53)
    assert got.accuracy == pytest.approx((0.9 * 8 + 0.8 * 10 + 0.6 * 30 + 1.0) / 53)
    assert (got.clients, got.examples) == (5, 53.0)
    assert d.evaluate_round(3, PARAMS, clients=[4, 5]) is None
    assert d.evaluate_round(3, PARAMS, clients=[1], registered={}) is None


def _histograms(positives, negatives):
    """``[2, 2, B]`` int64 histograms from per-class positive and negative bin counts."""
    return torch.tensor([[positives[0], negatives[0]], [positives[1], negatives[1]]])


def test_evaluation_adds_histograms_and_confusion_matrices() -> None:
    # client 1: 4 examples, 3 of class 1; client 2: 6 examples, weighed as 3 (share 1/2)
    h1 = _histograms([[1, 0, 0, 0], [0, 0, 2, 1]], [[0, 2, 1, 0], [1, 0, 0, 0]])
    c1 = torch.tensor([[1, 0], [1, 2]])
    h2 = _histograms([[2, 2, 0, 0], [0, 1, 0, 1]], [[0, 0, 1, 1], [2, 0, 2, 0]])
    c2 = torch.tensor([[3, 1], [0, 2]])
    answers = {
        1: _eval_reply(1, 4, 0.5, 0.75, tensors={"score_histograms": h1, "confusion": c1}),
        2: _eval_reply(2, 6, 1.0, 0.8, tensors={"score_histograms": h2, "confusion": c2}),
    }
    d, transport, _ = _driver(answers)
    got = d.evaluate_round(3, PARAMS, registered={1: 4, 2: 3}, num_classes=2, score_bins=4)
    task = messages.decode(transport.sent[1], messages.EvaluateTask)
    assert task.config == {"score_bins": 4, "num_classes": 2}
    confusion = c1.double() + 0.5 * c2.double()
    assert torch.equal(got.confusion, confusion)
    assert got.accuracy == (1 + 2 + 1.5 + 1) / 7  # the trace over the total, not 0.75/0.8
    # AUC of class 1 by hand from the summed histograms: positives per bin p, negatives q
    p = [0.0, 0.5, 2.0, 1.5]
    q = [2.0, 0.0, 1.0, 0.0]
    pairs = sum(p[b] * (sum(q[:b]) + q[b] / 2) for b in range(4))
    assert got.auc == pytest.approx(pairs / (sum(p) * sum(q)))
    assert got.loss == pytest.approx((0.5 * 4 + 1.0 * 3) / 7)
    assert (got.clients, got.examples) == (2, 7.0)
    # the default bin count is SCORE_BINS
    d.evaluate_round(3, PARAMS, num_classes=2)
    assert messages.decode(transport.sent[1], messages.EvaluateTask).config == {
        "score_bins": driver.SCORE_BINS,
        "num_classes": 2,
    }
    assert driver.SCORE_BINS == 1000


def test_evaluation_adds_counts_beyond_float32_exactly() -> None:
    """Histograms and confusion matrices are added in float64: counts above 2^24, which float32
    rounds, give the exact accuracy and AUC."""
    big = 2**24
    # class 1: big + 2 examples (positives [big + 1, 0, 0, 1]), class 0: 1 example
    h = _histograms([[0, 1, 0, 0], [big + 1, 0, 0, 1]], [[big + 1, 0, 0, 1], [0, 0, 1, 0]])
    c = torch.tensor([[1, 0], [5, big - 3]])
    n = big + 3
    answers = {1: _eval_reply(1, n, 0.5, 0.5, tensors={"score_histograms": h, "confusion": c})}
    d, _, _ = _driver(answers)
    got = d.evaluate_round(3, PARAMS, num_classes=2, score_bins=4)
    assert got.confusion.dtype == torch.float64 and torch.equal(got.confusion, c.double())
    assert got.accuracy == (big - 2) / (big + 3)
    # one positive (bin 3) above the one negative (bin 2); the other big + 1 positives below it
    assert got.auc == pytest.approx(1 / (big + 2), rel=1e-12, abs=0)
    assert got.examples == float(n)


def test_every_evaluation_check_names_its_reason() -> None:
    d, _, _ = _driver({0: None, 1: None})
    h = _histograms([[1, 0], [0, 1]], [[0, 1], [1, 0]])  # 2 examples, one of each class
    c = torch.tensor([[1, 0], [0, 1]])

    def check(n=2, loss=0.5, acc=0.5, tensors=None, round_=3, classes=2):
        outcome = _eval_reply(1, n, loss, acc, round_=round_, tensors=tensors)
        if loss is None:
            reply = messages.EvaluateReply(3, 1, n, {"accuracy": acc})
            outcome = Delivered(1, messages.encode(reply), 0.1)
        reply, reason = d._check_evaluate_reply(outcome, 3, classes, 2)
        return reason if reply is None else ("ok", reply.client_id, reason)

    ok = {"score_histograms": h, "confusion": c}
    assert check(tensors=ok) == ("ok", 1, "")
    assert check(classes=None) == ("ok", 1, "")
    assert check(round_=4) == "reply is for client 1 round 4, expected client 1 round 3"
    assert check(n=0) == check(loss=None) == check(acc=math.inf) == "bad metrics"
    assert check(loss=math.nan, classes=None) == "bad metrics"
    shape = "'score_histograms' must be an int64 tensor of shape (2, 2, 2), got "
    assert check(tensors={"confusion": c}) == shape + "None"
    assert check(tensors={**ok, "score_histograms": h[:, :, :1]}) == (
        shape + "((2, 2, 1), torch.int64)"
    )
    assert check(tensors={**ok, "score_histograms": h.double()}) == (
        shape + "((2, 2, 2), torch.float64)"
    )
    assert check(tensors={**ok, "confusion": c[:1]}) == (
        "'confusion' must be an int64 tensor of shape (2, 2), got ((1, 2), torch.int64)"
    )
    assert check(tensors={**ok, "score_histograms": h * -1}) == (
        "'score_histograms' holds negative counts"
    )
    assert check(tensors={**ok, "confusion": torch.tensor([[2, -1], [0, 1]])}) == (
        "'confusion' holds negative counts"
    )
    assert check(n=3, tensors=ok) == "the score histograms do not count its 3 examples"
    # class 1's histograms count 3 examples, class 0's the right 2
    uneven = _histograms([[1, 0], [0, 2]], [[0, 1], [1, 0]])
    assert check(tensors={**ok, "score_histograms": uneven}) == (
        "the score histograms do not count its 2 examples"
    )
    assert check(tensors={**ok, "confusion": torch.tensor([[1, 0], [0, 0]])}) == (
        "the confusion matrix does not count its 2 examples"
    )
    # the right total, the wrong rows: class 0's row must count its positives (1)
    assert check(tensors={**ok, "confusion": torch.tensor([[2, 0], [0, 0]])}) == (
        "the confusion matrix does not count its 2 examples"
    )
    try:
        messages.decode(b"\x00", messages.EvaluateReply)
    except messages.MessageError as exc:
        malformed = str(exc)
    assert d._check_evaluate_reply(Delivered(1, b"\x00", 0.1), 3, 2, 2) == (None, malformed)
    # a fit reply (even one with a loss and an accuracy) is not an evaluation reply
    fit = messages.FitReply(3, 1, torch.zeros(DIM), 2, {"loss": 0.5, "accuracy": 0.5})
    payload = messages.encode(fit)
    try:
        messages.decode(payload, messages.EvaluateReply)
    except messages.MessageError as exc:
        wrong_kind = str(exc)
    assert "EvaluateReply" in wrong_kind
    assert d._check_evaluate_reply(Delivered(1, payload, 0.1), 3, None, 2) == (None, wrong_kind)


# --- secure aggregation rounds, with real secure-aggregation clients


SECURE_UPDATES = {
    0: [0.5, -0.25, 1.0],
    1: [-1.0, 0.75, 0.5],
    2: [0.25, 0.25, -0.5],
    3: [2.0, -1.5, 0.25],
}


def _secure_driver(counts, settings, *, min_clients=3, tamper=None, drop=(), **kwargs):
    """Four secure-aggregation clients with SECURE_UPDATES and example counts ``counts``;
    ``tamper(client_id, masked uint32 words)`` edits masked inputs on their way back."""
    tasks: dict[int, messages.FitTask] = {}
    setups: list[messages.SecAggSetup] = []

    def fit(task: messages.FitTask) -> messages.FitReply:
        if task.client_id in drop:
            raise RuntimeError("gone")
        tasks[task.client_id] = task
        update = torch.tensor(SECURE_UPDATES[task.client_id])
        return messages.FitReply(task.round, task.client_id, update, counts[task.client_id])

    client = secagg_client.SecAggClient(fit)

    def handler(cid: int, payload: bytes) -> bytes:
        request = messages.decode(payload)
        if isinstance(request, messages.SecAggSetup):
            setups.append(request)
        reply = client.handle(request)
        if tamper is not None and isinstance(reply, messages.SecAggMaskedInput):
            words = reply.masked.numpy().view(np.uint32).copy()
            tamper(cid, words)
            reply = messages.SecAggMaskedInput(
                reply.round, cid, torch.from_numpy(words.view(np.int32))
            )
        return messages.encode(reply)

    transport = _Deadlines(InProcessTransport(handler, [0, 1, 2, 3]))
    strategy = _Recorder()
    d = driver.RoundDriver(
        transport,
        strategy,
        dim=DIM,
        clients_per_round=kwargs.pop("clients_per_round", 4),
        min_clients=min_clients,
        seed=21,
        secure_aggregation=settings,
        **kwargs,
    )
    return d, strategy, tasks, setups, transport


class _Deadlines(Transport):
    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.deadlines: list[float | None] = []

    @property
    def client_ids(self):
        return self.inner.client_ids

    def exchange(self, requests, *, deadline_s):
        self.deadlines.append(deadline_s)
        return self.inner.exchange(requests, deadline_s=deadline_s)


def _plus(delta: int):
    def tamper(cid: int, words: np.ndarray) -> None:
        if cid == 0:
            words[-1] = (int(words[-1]) + delta) % 2**32  # the weight word, in the ring

    return tamper


def test_a_secure_round_hands_the_unmasked_weighted_sum_to_the_strategy() -> None:
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, tasks, setups, transport = _secure_driver(counts, settings, deadline_s=30.0)
    state = {"s": torch.tensor([1.0])}
    result = d.fit_round(2, PARAMS, state)
    (got_state, got_params, total, weight, round_) = strategy.sums[0]
    assert got_state is state and got_params is PARAMS and round_ == 2
    assert weight == 22.0 and isinstance(weight, float)
    expected = sum(counts[c] * torch.tensor(SECURE_UPDATES[c], dtype=torch.float64) for c in counts)
    assert total.dtype == torch.float64 and float((total - expected).abs().max()) < 1e-4
    for cid, task in tasks.items():
        assert task.config == {**CONFIG, "seed": driver.client_seed(21, 2, cid)}
        assert torch.equal(task.parameters, PARAMS) and torch.equal(task.tensors["extra"], EXTRA)
    assert sorted(tasks) == [0, 1, 2, 3]
    assert {s.graph_seed for s in setups} == {driver.graph_seed(21, 2)}
    assert {s.dim for s in setups} == {DIM}
    assert set(transport.deadlines) == {30.0}
    assert torch.equal(result.params, PARAMS + strategy.step) and result.state is strategy.state_out
    assert result.metrics["aggregate_rejected"] is None
    assert result.metrics["clients_sampled"] == 4 and result.metrics["clients_completed"] == 4
    assert result.sampled == [0, 1, 2, 3] and result.problems == [] and result.reported == {}
    assert not strategy.calls
    assert strategy.instructed == [state] and strategy.instructed[0] is state


def test_a_secure_round_of_two_clients() -> None:
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, tasks, _, _ = _secure_driver(counts, settings, min_clients=2, clients_per_round=2)
    result = d.fit_round(2, PARAMS, {})
    sampled = driver.sample_clients([0, 1, 2, 3], 2, seed=21, round_=2)
    assert result.sampled == sampled == sorted(tasks)
    assert strategy.sums[0][3] == float(sum(counts[c] for c in sampled))


def test_a_secure_round_needs_min_clients_masked_inputs() -> None:
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, _, _, _ = _secure_driver(counts, settings, min_clients=3, drop={3})
    result = d.fit_round(2, PARAMS, {})
    assert strategy.sums[0][3] == 16.0
    assert [c for c, _ in result.problems] == [3]
    d, strategy, _, _, _ = _secure_driver(counts, settings, min_clients=4, drop={3})
    with pytest.raises(secagg.SecAggAbortedError):
        d.fit_round(2, PARAMS, {})
    assert not strategy.sums


def test_a_secure_round_rejects_a_weight_no_honest_cohort_can_have() -> None:
    top = {c: 8 for c in range(4)}  # every weight at max_weight: the sum is at the top, 32
    weighted = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, _, _, _ = _secure_driver(top, weighted)
    d.fit_round(2, PARAMS, {})
    assert strategy.sums[0][3] == 32.0
    d, strategy, _, _, _ = _secure_driver(top, weighted, tamper=_plus(1))
    with pytest.raises(secagg.SecAggAbortedError, match=r"weight 33 is outside \[4, 32\]") as info:
        d.fit_round(2, PARAMS, {})
    assert info.value.metrics["clients_completed"] == 4 and not strategy.sums
    ones = {c: 1 for c in range(4)}  # every weight 1: the sum is at the bottom, 4
    d, strategy, _, _, _ = _secure_driver(ones, weighted, tamper=_plus(-1))
    with pytest.raises(secagg.SecAggAbortedError, match=r"weight 3 is outside \[4, 32\]"):
        d.fit_round(2, PARAMS, {})
    d, strategy, _, _, _ = _secure_driver(ones, weighted)
    d.fit_round(2, PARAMS, {})
    assert strategy.sums[0][3] == 4.0
    # unweighted: every client's weight is 1 whatever it claims, so the sum must be exactly 4
    unweighted = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8, weighted=False)
    d, strategy, _, _, _ = _secure_driver(top, unweighted)
    d.fit_round(2, PARAMS, {})
    assert strategy.sums[0][3] == 4.0
    d, strategy, _, _, _ = _secure_driver(top, unweighted, tamper=_plus(1))
    with pytest.raises(secagg.SecAggAbortedError, match=r"weight 5 is outside \[4, 4\]"):
        d.fit_round(2, PARAMS, {})


def test_a_secure_round_that_cannot_start_is_aborted_with_its_counts() -> None:
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, tasks, _, _ = _secure_driver(counts, settings, min_clients=1, clients_per_round=1)
    with pytest.raises(secagg.SecAggAbortedError, match="got 1") as info:
        d.fit_round(2, PARAMS, {})
    assert info.value.metrics == {
        "clients_sampled": 1,
        "clients_completed": 0,
        "bytes_up": 0,
        "bytes_down": 0,
    }
    assert not tasks and not strategy.sums
    # an 8-bit ring cannot hold four clients' sums of weights up to 40: refused before anything
    # is sent
    tiny = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=40, bits=8)
    d, strategy, tasks, setups, _ = _secure_driver(counts, tiny)
    with pytest.raises(secagg.SecAggAbortedError, match="cannot run with 4 clients") as info:
        d.fit_round(2, PARAMS, {})
    assert info.value.metrics == {"clients_sampled": 4, "clients_completed": 0}
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not setups
    # a threshold the clients would refuse, caught by the setup
    loose = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8, threshold=2)
    d, _, _, setups, _ = _secure_driver(counts, loose)
    with pytest.raises(secagg.SecAggAbortedError, match="the threshold 2 is not more than half"):
        d.fit_round(2, PARAMS, {})
    assert not setups


def test_a_non_finite_secure_aggregate_leaves_the_model_unchanged() -> None:
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    d, strategy, _, _, _ = _secure_driver(counts, settings)
    strategy.step = torch.tensor([math.inf, 0.0, 0.0])
    state = {"s": torch.tensor([1.0])}
    result = d.fit_round(2, PARAMS, state)
    assert result.metrics["aggregate_rejected"] == "the aggregate is not finite"
    assert result.params is PARAMS and result.state is state


def test_with_identities_every_secure_round_is_verified_with_a_fresh_nonce() -> None:
    """Identities make each secure round a verified one: a fresh 32-byte nonce per round, the
    server holding the registry without private keys, and the same weighted sum as a
    semi-honest round."""
    counts = {0: 3, 1: 5, 2: 8, 3: 6}
    identities = secagg.Identities.simulated(21, [0, 1, 2, 3])
    settings = secagg.Settings(secagg.Mode.SECAGG, clip_norm=10.0, max_weight=8)
    setups: list[messages.SecAggSetup] = []

    def fit(task: messages.FitTask) -> messages.FitReply:
        update = torch.tensor(SECURE_UPDATES[task.client_id])
        return messages.FitReply(task.round, task.client_id, update, counts[task.client_id])

    client = secagg_client.SecAggClient(fit, identities=identities)

    def handler(cid: int, payload: bytes) -> bytes:
        request = messages.decode(payload)
        if isinstance(request, messages.SecAggSetup):
            setups.append(request)
        return messages.encode(client.handle(request))

    strategy = _Recorder()
    d = driver.RoundDriver(
        InProcessTransport(handler, [0, 1, 2, 3]),
        strategy,
        dim=DIM,
        clients_per_round=4,
        min_clients=3,
        seed=21,
        secure_aggregation=settings,
        identities=identities,
    )
    assert d.identities is not None and not d.identities.own
    assert dict(d.identities.registry) == dict(identities.registry)
    expected = sum(counts[c] * torch.tensor(SECURE_UPDATES[c], dtype=torch.float64) for c in counts)
    nonces = []
    for round_ in (2, 3):
        d.fit_round(round_, PARAMS, {})
        _, _, total, weight, got_round = strategy.sums[-1]
        assert got_round == round_ and weight == 22.0
        assert float((total - expected).abs().max()) < 1e-4  # fixed point: 2^-16 steps
        this = [s for s in setups if s.round == round_]
        assert len(this) == 4 and all(s.verified for s in this)
        assert len({s.nonce for s in this}) == 1 and len(this[0].nonce) == 32
        nonces.append(this[0].nonce)
    assert nonces[0] != nonces[1]
