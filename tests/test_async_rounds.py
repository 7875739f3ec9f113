"""Asynchronous rounds (FedBuff): staleness weights and buffer steps against a hand computation,
the virtual clock's ordering, resume equality, local DP's accounting, the live status's table of
tasks and the refusals."""

from __future__ import annotations

import json
import math
from collections import Counter

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from safetensors.torch import load_file

import fedguard
from conftest import tiny_config
from fedguard.algorithms.optimizers import fedbuff
from fedguard.experiment.config import ConfigError
from fedguard.protocol import fedopt, messages
from fedguard.protocol.async_driver import AsyncDriver, AsyncSettings, AsyncState
from fedguard.protocol.driver import RoundDriver, RoundFailedError, sample_clients
from fedguard.protocol.strategy import StrategyKind
from fedguard.simulation.inprocess import InProcessTransport
from fedguard.simulation.latency import Base, LatencyModel, VirtualClockStream

LATENCY = {"base": "exponential", "mean_s": 2.0, "slow_fraction": 0.34, "slowdown": 10.0}


def _rows(folder) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def _last_checkpoint(folder):
    return sorted((folder / "checkpoints").glob("round_*"))[-1]


def test_staleness_weights_by_hand() -> None:
    tau = torch.tensor([0, 1, 3, 8])
    assert fedbuff.staleness_weights(tau, 0.5).tolist() == pytest.approx(
        [1.0, 1 / math.sqrt(2), 0.5, 1 / 3]
    )
    assert fedbuff.staleness_weights(tau, 1.0).tolist() == pytest.approx([1, 0.5, 0.25, 1 / 9])
    assert fedbuff.staleness_weights(tau, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    rows = fedbuff.scaled_updates(torch.tensor([[2.0, -4.0], [3.0, 1.0]]), tau[1:3], 1.0)
    assert rows.tolist() == [[1.0, -2.0], [0.75, 0.25]]
    with pytest.raises(ValueError, match="negative"):
        fedbuff.staleness_weights(torch.tensor([-1]), 0.5)


# The hand-computed problem: two clients, client A answers in 1 s and client S (the slow one)
# in 2.5 s. Each returns ``w_c - x`` for the model ``x`` it received, claiming ``n_c`` examples.
W = {"A": torch.tensor([1.0, -2.0]), "S": torch.tensor([4.0, 0.5])}
N = {"A": 3, "S": 5}
LR = 0.7


def _two_clients(max_staleness: int) -> tuple[AsyncDriver, dict[int, str]]:
    latency = LatencyModel((0, 1), base=Base.CONSTANT, slow_fraction=0.5, slowdown=2.5, seed=5)
    (slow,) = latency.slow
    names = {slow: "S", 1 - slow: "A"}

    def handler(cid: int, payload: bytes) -> bytes:
        task = messages.decode(payload, messages.FitTask)
        name = names[cid]
        update = W[name] - task.parameters
        reply = messages.FitReply(task.round, cid, update, N[name], {"train_loss": 1.0})
        return messages.encode(reply)

    transport = InProcessTransport(handler, [0, 1], latency=latency)
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=2, server_lr=LR)
    checks = RoundDriver(transport, strategy, dim=2, clients_per_round=2, min_clients=1, seed=0)
    settings = AsyncSettings(
        concurrency=2, buffer_size=2, max_staleness=max_staleness, staleness_exponent=0.5
    )
    return AsyncDriver(checks, settings), names


def test_fedbuff_steps_match_a_hand_computation() -> None:
    driver, _ = _two_clients(max_staleness=10)
    x0 = torch.zeros(2)
    run = AsyncState()
    out = list(driver.rounds(x0, driver.checks.strategy.init(x0), run, until=3))
    a, s, n_a, n_s = W["A"], W["S"], N["A"], N["S"]
    s1 = 1 / math.sqrt(2)
    # t=1, t=2: A twice from version 0, staleness 0: a full buffer of A's.
    x1 = x0 + LR * (a - x0)
    # t=2.5: S's version-0 reply, staleness 1; t=3: A's version-1 reply, staleness 0.
    x2 = x1 + LR * (n_s * s1 * (s - x0) + n_a * (a - x1)) / (n_a + n_s)
    # t=4: A from version 2 (buffered); t=5: S from version 1 (sent at 2.5) and A from version 2
    # (sent at 4) arrive at once, S first (its task is older): S's staleness 1 fills the buffer.
    x3 = x2 + LR * (n_a * (a - x2) + n_s * s1 * (s - x1)) / (n_a + n_s)
    for got, want in zip([r.params for r in out], [x1, x2, x3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [r.metrics["simulated_seconds"] for r in out] == [2.0, 3.0, 5.0]
    assert [r.metrics["staleness_max"] for r in out] == [0, 1, 1]
    assert [r.metrics["staleness_mean"] for r in out] == [0.0, 0.5, 0.5]
    # the state at the third step (what a checkpoint holds): A's version-2 task, due at the
    # same t=5, is still in flight, and S is sent again only after the step.
    assert run.version == 3 and run.buffer == [] and run.clock == 5.0
    assert [(f.version, f.sent_at) for f in run.in_flight.values()] == [(2, 4.0)]


def test_replies_beyond_max_staleness_are_dropped() -> None:
    driver, _ = _two_clients(max_staleness=0)
    x0 = torch.zeros(2)
    out = list(driver.rounds(x0, driver.checks.strategy.init(x0), AsyncState(), until=2))
    a = W["A"]
    x1 = x0 + LR * (a - x0)
    x2 = x1 + LR * (a - x1)  # S's reply (staleness 1 at t=2.5) is dropped
    torch.testing.assert_close(out[1].params, x2, rtol=1e-6, atol=1e-6)
    assert [r.metrics["clients_stale"] for r in out] == [0, 1]
    assert out[1].problems[0][1].startswith("stale: trained on version 0")


def test_a_run_whose_clients_always_fail_stops_with_the_reason() -> None:
    def broken(cid: int, payload: bytes) -> bytes:
        raise OSError("disk full")

    transport = InProcessTransport(broken, [0, 1, 2])
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=3)
    checks = RoundDriver(transport, strategy, dim=2, clients_per_round=3, min_clients=1, seed=0)
    driver = AsyncDriver(checks, AsyncSettings(concurrency=2, buffer_size=2, max_staleness=5))
    run = AsyncState()
    with pytest.raises(RoundFailedError, match="no buffer of 2 filled.*OSError: disk full"):
        list(driver.rounds(torch.zeros(2), strategy.init(torch.zeros(2)), run, until=1))
    assert run.version == 0 and run.next_task - 1 == 50 * 2 + 2 + 1


def test_virtual_clock_delivers_in_time_order() -> None:
    ids = tuple(range(10))
    latency = LatencyModel(ids, base=Base.EXPONENTIAL, mean_s=3.0, slow_fraction=0.3, seed=9)
    assert len(latency.slow) == 3
    stream = VirtualClockStream(lambda cid, payload: payload + bytes([cid]), latency, start_s=5.0)
    sent = {}
    for task, cid in enumerate([4, 1, 7, 2, 9, 0], start=1):
        sent[task] = (cid, stream.submit(task, cid, b"x", sent_at=5.0 + 0.5 * task))
    expected = sorted((t0 + latency.seconds(cid, task), task) for task, (cid, t0) in sent.items())
    got = [stream.next() for _ in sent]
    assert [(g.at, g.task) for g in got] == expected
    assert stream.now() == expected[-1][0]
    for g in got:
        assert g.outcome.payload == b"x" + bytes([sent[g.task][0]])
    # with a deadline, a task slower than it arrives as a timeout at sent + deadline
    timed = VirtualClockStream(lambda cid, payload: payload, latency, deadline_s=4.0)
    for task, cid in enumerate(ids, start=1):
        timed.submit(task, cid, b"y")
    arrivals = [timed.next() for _ in ids]
    for g in arrivals:
        late = latency.seconds(g.outcome.client_id, g.task) > 4.0
        assert (g.at == 4.0 and g.outcome.kind == "timeout") if late else g.outcome.payload == b"y"
    assert any(g.at == 4.0 for g in arrivals) and any(g.at < 4.0 for g in arrivals)
    # a slow client's task takes slowdown times its base draw
    slow = min(latency.slow)
    fast = LatencyModel(ids, base=Base.EXPONENTIAL, mean_s=3.0, seed=9)
    assert latency.seconds(slow, 17) == pytest.approx(10.0 * fast.seconds(slow, 17))
    # the log-normal base has the mean it is given
    lognormal = LatencyModel((0,), base=Base.LOGNORMAL, mean_s=2.0, sigma=0.5)
    draws = np.array([lognormal.seconds(0, k) for k in range(20_000)])
    assert draws.mean() == pytest.approx(2.0, rel=0.02)


def test_sync_rounds_last_as_long_as_their_slowest_client(tmp_path) -> None:
    cfg = tiny_config(experiment={"rounds": 3}, runtime={"latency": LATENCY})
    fedguard.run(cfg, out=tmp_path / "r", progress=False)
    rows = _rows(tmp_path / "r")
    latency = LatencyModel(
        tuple(range(6)), base=Base.EXPONENTIAL, mean_s=2.0, slow_fraction=0.34, seed=3
    )
    clock = 0.0
    for r in rows:
        sampled = sample_clients(list(range(6)), 4, seed=3, round_=r["round"])
        clock += max(latency.seconds(c, r["round"]) for c in sampled)
        assert r["simulated_seconds"] == pytest.approx(clock, rel=1e-12)


@pytest.mark.parametrize(
    "server",
    [{"strategy": "fedavgm", "server_lr": 0.8}, {"aggregator": "median", "byzantine_f": 1}],
)
def test_async_resume_equals_uninterrupted(tmp_path, server) -> None:
    def cfg(rounds: int) -> dict:
        return tiny_config(
            experiment={"rounds": rounds},
            server={"mode": "async", "concurrency": 4, "buffer_size": 3, **server},
            runtime={"latency": LATENCY},
        )

    fedguard.run(cfg(6), out=tmp_path / "full", progress=False)
    fedguard.run(cfg(3), out=tmp_path / "part", progress=False)
    saved = json.loads((_last_checkpoint(tmp_path / "part") / "state.json").read_text())
    # the stop leaves work in flight: all but the slot of the reply that completed the buffer
    assert len(saved["async"]["in_flight"]) == 3
    fedguard.run(cfg(6), out=tmp_path / "part", resume=True, progress=False)
    full, part = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert full == part
    assert max(r["staleness_max"] for r in full) >= 1  # stale replies were weighted
    a = load_file(str(_last_checkpoint(tmp_path / "full") / "tensors.safetensors"))
    b = load_file(str(_last_checkpoint(tmp_path / "part") / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_local_dp_counts_every_dispatch(tmp_path) -> None:
    local = {"mode": "local", "noise_multiplier": 1.3, "max_grad_norm": 1.0, "delta": 1e-3}
    cfg = tiny_config(
        experiment={"rounds": 4},
        server={"mode": "async", "concurrency": 3, "buffer_size": 2},
        privacy=local,
        runtime={"latency": LATENCY},
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    saved = json.loads((_last_checkpoint(tmp_path / "r") / "state.json").read_text())
    times = Counter(cid for cid, _ in saved["async"]["dispatched"])
    clients = summary["privacy"]["clients"]

    def direct(q: float, steps: int) -> float:
        acc = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return acc.get_epsilon(1e-3)

    worst = 0.0
    for cid, count in times.items():
        c = clients[str(cid)]
        steps_per_task = round(1 / c["sampling_rate"])  # one epoch of Poisson batches
        assert c["rounds_joined"] == count
        worst = max(worst, direct(c["sampling_rate"], count * steps_per_task))
    # the tasks still in flight at the end count too (their clients may have trained)
    applied = sum(r["clients_completed"] for r in _rows(tmp_path / "r"))
    assert sum(times.values()) == applied + len(saved["async"]["in_flight"]) > applied
    assert summary["epsilon"] == pytest.approx(worst)


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"secure_aggregation": {"enabled": True, "clip_norm": 1.0}}, "secure_aggregation"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0}}, '"central"'),
        (
            {"privacy": {"mode": "local", "noise_multiplier": 1.0, "max_epsilon": 5.0}},
            "max_epsilon",
        ),
        ({"server": {"sampling": "poisson"}}, "sampling must be"),
        ({"runtime": {"kind": "ray"}}, "no reply stream"),
        ({"server": {"strategy": "scaffold"}}, "SCAFFOLD"),
        ({"attack": {"kind": "sign_flip", "fraction": 0.2}}, "model-poisoning"),
        ({"contribution": {"method": "cosine"}}, "contributions"),
        ({"server": {"concurrency": 7}}, "more than the 6 clients"),
        ({"server": {"aggregator": "krum", "byzantine_f": 1, "buffer_size": 3}}, "krum"),
    ],
)
def test_what_does_not_compose_is_refused(tmp_path, sections, match) -> None:
    base = tiny_config(server={"mode": "async"})
    for table, values in sections.items():
        base.setdefault(table, {}).update(values)
    with pytest.raises(ConfigError, match=match):
        fedguard.run(base, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_async_keys_are_refused_in_sync_mode(tmp_path) -> None:
    with pytest.raises(ConfigError, match='server.buffer_size is set but server.mode = "sync"'):
        fedguard.run(tiny_config(server={"buffer_size": 2}), out=tmp_path / "r", progress=False)


def test_the_status_file_lists_every_task_of_the_last_buffer(tmp_path) -> None:
    cfg = tiny_config(
        experiment={"rounds": 3},
        server={
            "mode": "async",
            "concurrency": 4,
            "buffer_size": 3,
            "aggregator": "trimmed_mean",
            "byzantine_f": 1,
            "deadline_s": 4.0,  # the slow clients time out
        },
        runtime={"latency": LATENCY},
    )
    fedguard.run(cfg, out=tmp_path / "r", progress=False)
    last = _rows(tmp_path / "r")[-1]
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["mode"] == "async" and status["state"] == "completed"
    current = status["current"]
    assert current["round"] == 3 and current["phase"] == "done"
    assert current["robust_rule"] == "trimmed_mean" and current["clients_left_out"] is None
    tasks = current["clients"]
    by_status = Counter(t["status"] for t in tasks)
    assert by_status["replied"] == last["clients_completed"] == 3
    assert by_status["failed"] == last["clients_failed"] >= 1
    assert by_status["training"] == 3  # every slot but the one whose reply filled the buffer
    assert set(by_status) <= {"replied", "failed", "rejected", "stale", "training"}
    replied = [t for t in tasks if t["status"] == "replied"]
    assert max(t["staleness"] for t in replied) == last["staleness_max"]
    assert all(t["seconds"] > 0 for t in replied)
    # the trim cuts 2f = 2 of the 3 values of every coordinate (no ties in float updates)
    assert sum(t["trimmed_share"] for t in replied) == pytest.approx(2.0, abs=1e-3)
    for t in tasks:
        if t["status"] == "failed":
            assert t["reason"].startswith("timeout: ") and t["seconds"] == 4.0
        if t["status"] == "training":
            assert t["seconds"] is None and t["trimmed_share"] is None
