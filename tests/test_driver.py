"""The round driver against misbehaving clients: rejected, logged, counted, round goes on."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import tiny_config
from fedguard.experiment import config
from fedguard.experiment.assembly import Experiment
from fedguard.protocol import messages
from fedguard.protocol.driver import RoundFailedError, sample_clients
from fedguard.runtime.inprocess import InProcessTransport


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
    """With the bad clients removed the result equals a round run on the good clients only."""
    exp = _experiment()
    params = exp.initial_params
    state = exp.strategy.init(params)
    _sabotage(exp, {0: "nan", 1: "raise"})
    with_bad = exp.driver.fit_round(1, params, state).params
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
