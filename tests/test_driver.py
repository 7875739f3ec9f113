"""The round driver against misbehaving clients: rejected, logged, counted, round goes on."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedguard.experiment import config
from fedguard.experiment.assembly import Experiment
from fedguard.protocol import messages
from fedguard.protocol.driver import RoundFailedError, sample_clients
from fedguard.simulation.inprocess import InProcessTransport


def _experiment(**server) -> Experiment:
    return Experiment(
        config.validate(tiny_config(server={"clients_per_round": 6, "min_clients": 3, **server}))
    )


def _sabotage(exp: Experiment, bad: dict[int, str]) -> None:
    honest = exp.app.handle

    def handler(client_id: int, payload: bytes) -> bytes:
        kind = bad.get(client_id)
        if kind == "raise":
            raise RuntimeError("disk full")
        reply = messages.decode(honest(client_id, payload))
        if kind == "nan":
            reply = messages.FitReply(
                reply.round, client_id, reply.update * float("nan"), reply.num_examples
            )
        elif kind == "short":
            reply = messages.FitReply(reply.round, client_id, reply.update[:-1], reply.num_examples)
        elif kind == "garbage":
            return b"\x00garbage"
        elif kind == "impostor":
            reply = messages.FitReply(reply.round, client_id + 1, reply.update, reply.num_examples)
        elif kind == "zero_examples":
            reply = messages.FitReply(reply.round, client_id, reply.update, 0)
        return messages.encode(reply)

    exp.driver.transport = InProcessTransport(handler, exp.transport.client_ids)


def test_bad_clients_are_rejected_and_the_round_goes_on(caplog) -> None:
    exp = _experiment()
    _sabotage(exp, {0: "raise", 1: "nan", 2: "short"})
    params = exp.initial_params
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        result = exp.driver.fit_round(1, params, exp.strategy.init(params))
    m = result.metrics
    assert (m["clients_sampled"], m["clients_completed"]) == (6, 3)
    assert (m["clients_failed"], m["clients_rejected"]) == (1, 2)
    reasons = dict(result.problems)
    assert "disk full" in reasons[0]
    assert "NaN" in reasons[1]
    assert f"expected ({exp.model.spec.size},)" in reasons[2]
    assert "client 1 rejected" in caplog.text and "client 0 failed" in caplog.text
    assert torch.isfinite(result.params).all()
    assert not torch.equal(result.params, params)


def test_garbage_impostor_and_empty_replies_are_rejected() -> None:
    exp = _experiment()
    _sabotage(exp, {3: "garbage", 4: "impostor", 5: "zero_examples"})
    params = exp.initial_params
    result = exp.driver.fit_round(1, params, exp.strategy.init(params))
    assert result.metrics["clients_rejected"] == 3
    reasons = dict(result.problems)
    assert "Malformed" in reasons[3]
    assert "reply is for client 5" in reasons[4]
    assert "num_examples must be positive" in reasons[5]


def test_aggregate_uses_only_accepted_clients() -> None:
    """The result is the example-weighted mean of the accepted updates (computed by hand here)
    and equals a round run on the good clients only."""
    exp = _experiment()
    params = exp.initial_params
    state = exp.strategy.init(params)
    honest = exp.app.handle
    sent: dict[int, messages.FitReply] = {}

    def recording(client_id: int, payload: bytes) -> bytes:
        reply = honest(client_id, payload)
        sent[client_id] = messages.decode(reply, messages.FitReply)
        return reply

    exp.app.handle = recording  # the honest replies, before the sabotage rewrites 0 and 1
    _sabotage(exp, {0: "nan", 1: "raise"})
    with_bad = exp.driver.fit_round(1, params, state).params

    # FedAvg by hand over the four accepted replies, weights = their example counts (unequal,
    # none of them 1), in float64: params + sum_c n_c u_c / sum_c n_c.
    good = [sent[c] for c in (2, 3, 4, 5)]
    counts = [r.num_examples for r in good]
    assert len(set(counts)) == 4 and min(counts) > 1, counts
    mean = [0.0] * len(params)
    for r in good:
        for j, u in enumerate(r.update.tolist()):
            mean[j] += r.num_examples * u / sum(counts)
    expected = torch.tensor([p + m for p, m in zip(params.tolist(), mean, strict=True)])
    torch.testing.assert_close(with_bad, expected.float(), rtol=0, atol=1e-6)
    clean = _experiment()
    good = {c: p for c, p in clean.fed.clients.items() if c not in (0, 1)}
    clean.app.data = good
    clean.driver.transport = InProcessTransport(
        lambda c, p: clean.app.handle(c, p) if c in good else (_ for _ in ()).throw(KeyError(c)),
        clean.transport.client_ids,
    )
    assert torch.allclose(with_bad, clean.driver.fit_round(1, params, state).params, atol=1e-7)


def test_too_few_replies_fail_the_round_with_the_reasons() -> None:
    exp = _experiment()
    _sabotage(exp, {0: "raise", 1: "raise", 2: "nan", 3: "nan"})
    params = exp.initial_params
    with pytest.raises(
        RoundFailedError, match="only 2 usable replies of 6 sampled, min_clients is 3"
    ):
        exp.driver.fit_round(1, params, exp.strategy.init(params))


def test_deadline_turns_slow_clients_into_timeouts() -> None:
    exp = _experiment(deadline_s=5.0)
    honest = exp.app.handle
    now = [0.0]

    def slow(client_id: int, payload: bytes) -> bytes:
        now[0] += 60.0 if client_id == 2 else 1.0  # a fake clock: client 2 takes a minute
        return honest(client_id, payload)

    exp.driver.transport = InProcessTransport(slow, exp.transport.client_ids, clock=lambda: now[0])
    params = exp.initial_params
    result = exp.driver.fit_round(1, params, exp.strategy.init(params))
    assert result.metrics["clients_failed"] == 1
    assert "timeout" in dict(result.problems)[2]


def test_failed_round_stops_the_run_after_saving(tmp_path, monkeypatch) -> None:
    import fedguard
    from fedguard.experiment import assembly

    real = assembly.Experiment.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        honest = self.app.handle

        def handler(client_id, payload):
            if messages.decode(payload).round >= 2:
                raise RuntimeError("hospital offline")
            return honest(client_id, payload)

        self.driver.transport = InProcessTransport(handler, self.transport.client_ids)

    monkeypatch.setattr(assembly.Experiment, "__init__", init)
    with pytest.raises(RoundFailedError, match="Round 2"):
        fedguard.run(tiny_config(), out=tmp_path / "r", progress=False)
    import json

    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert (tmp_path / "r" / "checkpoints" / "round_00001").exists()


def _recording_transport(exp: Experiment, asked: list[tuple[int, int]]) -> None:
    """Clients that only record which (round, client) got a fit task and reply at once."""

    def handler(client_id: int, payload: bytes) -> bytes:
        task = messages.decode(payload, messages.FitTask)
        asked.append((task.round, client_id))
        update = torch.zeros_like(task.parameters)
        return messages.encode(messages.FitReply(task.round, client_id, update, 5))

    exp.driver.transport = InProcessTransport(handler, exp.transport.client_ids)


def test_poisson_cohorts_are_binomial_and_are_the_clients_that_train() -> None:
    """server.sampling = "poisson" with 12 expected of 40 clients (q = 0.3) over 400 rounds: the
    cohort sizes that reach the transport follow Binomial(40, 0.3) (mean 12, variance 8.4),
    every client joins about 30 % of rounds, and the fit tasks go to exactly the sampled ones.
    A fixed-size sampler (variance 0) fails the variance check."""
    n, q, rounds = 40, 0.3, 400
    cfg = tiny_config(
        data={"num_clients": n, "partition": "iid", "synthetic_samples": 1200},
        server={"sampling": "poisson", "clients_per_round": round(q * n), "min_clients": 1},
    )
    exp = Experiment(config.validate(cfg))
    asked: list[tuple[int, int]] = []
    _recording_transport(exp, asked)
    params = exp.initial_params
    state = exp.strategy.init(params)
    sizes = []
    for r in range(1, rounds + 1):
        result = exp.driver.fit_round(r, params, state)
        got = sorted(c for rr, c in asked if rr == r)
        assert got == sorted(result.sampled)  # the clients that trained are the sampled ones
        assert result.metrics["clients_sampled"] == len(got)
        sizes.append(len(got))
    sizes_ = np.array(sizes, dtype=np.float64)
    mean, var = n * q, n * q * (1 - q)
    # Standard errors over 400 rounds: mean 0.145, variance about 0.6; both checked at 4 of them.
    assert abs(sizes_.mean() - mean) < 4 * math.sqrt(var / rounds)
    assert abs(sizes_.var(ddof=1) - var) < 4 * var * math.sqrt(2 / (rounds - 1))
    # Chi-square of the size histogram against Binomial(40, 0.3), sizes pooled into 7..17 with
    # both tails in the end bins (every expected count >= 10): 10 degrees of freedom, and
    # 29.6 is the 0.999 quantile.
    bins = np.clip(sizes_, 7, 17).astype(int) - 7
    observed = np.bincount(bins, minlength=11)
    pmf = np.array([math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)])
    expected = rounds * np.concatenate([[pmf[:8].sum()], pmf[8:17], [pmf[17:].sum()]])
    assert expected.min() >= 10 and expected.sum() == pytest.approx(rounds)
    assert float(((observed - expected) ** 2 / expected).sum()) < 29.6
    # Each client joins Binomial(400, 0.3) rounds: standard deviation 9.2, here 4.5 of them.
    joined = np.bincount([c for _, c in asked], minlength=n) / rounds
    assert np.abs(joined - q).max() < 4.5 * math.sqrt(q * (1 - q) / rounds)


def test_sampling_is_seeded_and_without_replacement() -> None:
    ids = list(range(100))
    a = sample_clients(ids, 10, seed=1, round_=5)
    assert a == sample_clients(ids, 10, seed=1, round_=5)
    assert a != sample_clients(ids, 10, seed=1, round_=6)
    assert len(set(a)) == 10 and a == sorted(a)


def test_messages_round_trip() -> None:
    reply = messages.FitReply(
        3, 7, torch.arange(4.0), 12, {"train_loss": 0.5}, {"control_delta": torch.ones(4)}
    )
    back = messages.decode(messages.encode(reply), messages.FitReply)
    assert back.round == 3 and back.client_id == 7 and back.num_examples == 12
    assert torch.equal(back.update, reply.update)
    assert torch.equal(back.tensors["control_delta"], torch.ones(4))
    with pytest.raises(messages.MessageError, match="Expected a FitTask"):
        messages.decode(messages.encode(reply), messages.FitTask)
    # float64 and integer side tensors keep their dtype; bfloat16 (no numpy dtype) is float32
    odd = {"f64": torch.arange(3, dtype=torch.float64), "i64": torch.tensor([-1, 2**40])}
    odd["bf16"] = torch.tensor([0.5, -2.0], dtype=torch.bfloat16, requires_grad=True)
    task = messages.FitTask(1, 2, torch.zeros(2, dtype=torch.float64), {"lr": 0.1}, odd)
    back_task = messages.decode(messages.encode(task), messages.FitTask)
    assert back_task.parameters.dtype == torch.float32 and back_task.config == {"lr": 0.1}
    assert back_task.tensors["f64"].dtype == torch.float64
    assert back_task.tensors["i64"].tolist() == [-1, 2**40]
    assert back_task.tensors["bf16"].dtype == torch.float32
    assert back_task.tensors["bf16"].tolist() == [0.5, -2.0]
    keys = messages.SecAggShares(4, 1, {3: b"\x00abc", 2: b""})
    assert messages.decode(messages.encode(keys)).ciphertexts == {2: b"", 3: b"\x00abc"}
