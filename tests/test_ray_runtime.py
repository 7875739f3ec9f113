"""The Ray runtime (``runtime.kind = "ray"``) gives the in-process simulator's results, on a Ray
cluster of two nodes (``ray.cluster_utils.Cluster``, one CPU each, so that the pool's two actors
sit on different nodes), for every kind of round: plain FedAvg, SCAFFOLD (client state across
rounds, and across a resume from an in-process run), secure aggregation, local and central DP,
model and data poisoning, federated evaluation, a user's model and data functions. It survives an
actor that dies, times out what misses the deadline, sends large exchanges in bounded batches,
refuses what cannot run before round 1, and its command line joins a running cluster.

One cluster serves the whole module (Ray starts slowly). The in-process reference runs in this
process with torch's default thread count, each actor with one thread: the tiny models here do
not split their sums across threads, and the comparisons allow 1e-6 for the float sums that
could differ if they did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

import fedguard
from conftest import REPO, metric_rows, tiny_config
from fedguard.client import personal as personal_mod
from fedguard.client import trainers
from fedguard.client.trainer import TrainResult, TrainTask
from fedguard.experiment import checkpoint
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError
from fedguard.protocol import features
from fedguard.protocol.transport import Delivered, Failed, FailureKind
from fedguard.simulation import ray_engine
from fedguard.simulation.dropout import FitFault, FitFaults

HERE = "test_ray_runtime"  # this module, as configs name its plug-ins
ATOL = 1e-6  # float sums the two engines might order differently (see the module docstring)
ROUNDS = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes of one CPU each, joined by this process; their workers import this module
    (its plug-ins) as the test process does."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "tests"), str(REPO / "src"), before or ""]
    )
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, configure_logging=False)
    try:
        yield nodes
    finally:
        ray_engine.release_idle_actors()
        ray.shutdown()
        nodes.shutdown()
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


# ------------------------------------------------------------------------------ plug-ins / hooks


class DyingTrainer(trainers.OptimizerTrainer):
    """The built-in loop, except that its process exits while training ``victim`` in ``round``
    (a crash of the actor, as a segfault or the OOM killer would cause)."""

    def __init__(self, victim: int, round: int) -> None:  # noqa: A002 - the option's name
        self.victim, self.round = victim, round

    def train(self, model, data, task: TrainTask) -> TrainResult:  # noqa: ANN001
        if (task.client_id, task.round) == (self.victim, self.round):
            os._exit(1)
        return super().train(model, data, task)


class _Echo:
    """Client code for the transport-level tests: replies ``b"<id>:<request>"``, raises on
    ``b"raise"``, counts its calls per client in its state; the clients in ``slow`` wait until the
    file ``release`` exists (at most a minute)."""

    def __init__(self, slow: Sequence[int], release: str) -> None:
        self.slow, self.release = frozenset(slow), Path(release)
        self.state: MutableMapping[int, dict[str, torch.Tensor]] = {}

    def handle(self, client_id: int, payload: bytes) -> bytes:
        if client_id in self.slow:
            for _ in range(600):
                if self.release.exists():
                    break
                time.sleep(0.1)
        if payload == b"raise":
            raise ValueError("bad request")
        seen = self.state.get(client_id, {}).get("calls", torch.zeros(()))
        self.state[client_id] = {"calls": seen + 1}
        return f"{client_id}:".encode() + payload


class EchoClients:
    """A picklable builder of :class:`_Echo` (what an actor calls with its client ids)."""

    def __init__(self, slow: Sequence[int], release: Path) -> None:
        self.slow, self.release = tuple(slow), str(release)

    def __call__(self, client_ids: Sequence[int]) -> _Echo:
        return _Echo(self.slow, self.release)


# ---------------------------------------------------------------------------------------- helpers


def _rounds(
    cfg: dict[str, Any],
    rounds: int = ROUNDS,
    faults: dict[tuple[int, int], FitFault] | None = None,
) -> tuple[list[dict[str, Any]], dict]:
    """Each round's driver metrics (timings left out), parameters and central metrics, and the
    clients' state at the end, from ``rounds`` rounds of ``cfg`` (with ``faults`` injected)."""
    exp = Experiment(config_mod.validate(cfg))
    try:
        if faults:
            exp.driver.transport = FitFaults(exp.driver.transport, faults)
        params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
        out = []
        for r in range(1, rounds + 1):
            result = exp.driver.fit_round(r, params, state)
            params, state = result.params, result.state
            metrics = {k: v for k, v in result.metrics.items() if "seconds" not in k}
            evaluated = exp.evaluate_round(r, params)  # the server's and/or the clients'
            out.append({"metrics": metrics, "params": params, "eval": evaluated})
        return out, {cid: dict(named) for cid, named in exp.client_state.items()}
    finally:
        exp.close()


def _assert_same_rounds(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["metrics"].keys() == y["metrics"].keys()
        for key, value in x["metrics"].items():
            if isinstance(value, float):
                assert y["metrics"][key] == pytest.approx(value, abs=ATOL), key
            else:
                assert y["metrics"][key] == value, key
        torch.testing.assert_close(y["params"], x["params"], rtol=0.0, atol=ATOL)
        for key, value in x["eval"].items():
            assert y["eval"][key] == pytest.approx(value, abs=ATOL), key


def _on_ray(cfg: dict[str, Any], **runtime: Any) -> dict[str, Any]:
    return {**cfg, "runtime": {"kind": "ray", **runtime}}


def _final_params(folder: Path) -> torch.Tensor:
    finished = checkpoint.resume_point(folder / "checkpoints", max_round=ROUNDS)
    assert finished is not None
    return finished.tensors["params"]


# ------------------------------------------------------------------------------------ equal runs


def test_fedavg_run_on_two_nodes_equals_the_in_process_run(cluster: Cluster, tmp_path) -> None:
    cfg = tiny_config()
    ray_cfg = _on_ray(cfg)
    exp = Experiment(config_mod.validate(ray_cfg))
    try:  # one actor per CPU of the cluster: one on each node, each with half the clients
        pool = exp.transport
        assert isinstance(pool, ray_engine.RayTransport)
        assert len(pool.nodes) == 2 and len(set(pool.nodes)) == 2
        assert sorted(pool.actor_of(c) for c in range(6)) == [0, 0, 0, 1, 1, 1]
        # this process keeps the clients' ids and sizes, not their data
        assert exp.fed.clients == {} and exp.app.data == {}
        assert exp.client_ids == list(range(6))
    finally:
        exp.close()
    local = fedguard.run(cfg, out=tmp_path / "local", progress=False)
    remote = fedguard.run(ray_cfg, out=tmp_path / "ray", progress=False)
    assert local["status"] == remote["status"] == "completed"
    rows = [metric_rows(tmp_path / name) for name in ("local", "ray")]
    assert len(rows[0]) == len(rows[1]) == ROUNDS
    for x, y in zip(*rows, strict=True):
        assert x.keys() == y.keys()
        for key in x.keys() - {"seconds"}:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], abs=ATOL), key
            else:
                assert y[key] == x[key], key
        assert x["clients_completed"] == 4
    torch.testing.assert_close(
        _final_params(tmp_path / "ray"), _final_params(tmp_path / "local"), rtol=0.0, atol=ATOL
    )
    assert remote["test_accuracy"] == pytest.approx(local["test_accuracy"], abs=ATOL)


def test_scaffold_keeps_each_clients_control_variate_across_rounds(cluster: Cluster) -> None:
    # 4 of 6 clients a round for 4 rounds: clients come back with the state they left
    cfg = tiny_config(server={"strategy": "scaffold", "clients_per_round": 4})
    local, local_state = _rounds(cfg, rounds=4)
    remote, remote_state = _rounds(_on_ray(cfg), rounds=4)
    _assert_same_rounds(local, remote)
    assert local_state.keys() == remote_state.keys() == set(range(6))
    for cid, named in local_state.items():
        torch.testing.assert_close(remote_state[cid], named, rtol=0.0, atol=ATOL)
        # every client trained: its last c_i+ is pending until the server's record names it
        assert float(named[features.CONTROL_PENDING].abs().sum()) > 0


def test_feddyn_with_a_lost_reply_and_ditto_give_the_in_process_results(cluster: Cluster) -> None:
    """FedDyn's g_k and Ditto's personal model travel with each client's task and come back
    with its reply; client 1's round-1 reply is lost after it trained (its state came back from
    its actor all the same): the model, the server's h and record, every client's state and
    the personal evaluation (mean, worst client, each client's) are the in-process run's."""
    cfg = tiny_config(
        server={"strategy": "feddyn", "feddyn_alpha": 0.1},
        personalization={"method": "ditto", "ditto_lambda": 0.3},
        data={"client_eval_fraction": 0.3},
    )
    faults = {(1, 1): FitFault.LOST}
    local, local_state = _rounds(cfg, faults=faults)
    remote, remote_state = _rounds(_on_ray(cfg), faults=faults)
    assert local[0]["metrics"]["clients_failed"] == 1 and 1 in local_state
    personal = [r["eval"].pop("personal_clients") for r in local]
    for r, clients in zip(remote, personal, strict=True):
        got = r["eval"].pop("personal_clients")
        assert [c["client"] for c in got] == [c["client"] for c in clients]
        for g, c in zip(got, clients, strict=True):
            assert g == pytest.approx(c, abs=ATOL)
    _assert_same_rounds(local, remote)
    assert local[-1]["eval"]["personal_accuracy_mean"] is not None
    assert local_state.keys() == remote_state.keys()
    for cid, named in local_state.items():
        assert named.keys() == remote_state[cid].keys()
        assert {features.FEDDYN_PENDING, personal_mod.STATE} <= named.keys()
        torch.testing.assert_close(remote_state[cid], named, rtol=0.0, atol=ATOL)


def test_a_client_too_small_to_hold_out_is_left_out_of_personal_evaluation_on_ray(
    cluster: Cluster,
) -> None:
    """Seed 9 with alpha 0.05 deals client 0 one training example, too few to hold out 30 %
    of: its actor answers the personal evaluation "no held-out data of its own", as the
    in-process client does, and only clients 1 and 2 count."""
    cfg = tiny_config(
        experiment={"seed": 9},
        data={
            "num_clients": 3,
            "alpha": 0.05,
            "synthetic_samples": 300,
            "client_eval_fraction": 0.3,
        },
        server={"clients_per_round": 3},
        personalization={"method": "ditto", "ditto_lambda": 0.3},
    )
    local, _ = _rounds(cfg, rounds=1)
    remote, _ = _rounds(_on_ray(cfg), rounds=1)
    for rows in (local, remote):
        assert [c["client"] for c in rows[0]["eval"]["personal_clients"]] == [1, 2]
    for g, c in zip(
        remote[0]["eval"].pop("personal_clients"),
        local[0]["eval"].pop("personal_clients"),
        strict=True,
    ):
        assert g == pytest.approx(c, abs=ATOL)
    _assert_same_rounds(local, remote)


@pytest.mark.parametrize(
    "sections",
    [
        {"secure_aggregation": {"enabled": True, "clip_norm": 1.0, "bits": 64}},
        {
            "privacy": {
                "mode": "local",
                "noise_multiplier": 1.1,
                "max_grad_norm": 1.0,
                "delta": 1e-3,
            }
        },
        {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3}},
        {"attack": {"kind": "sign_flip", "fraction": 0.34, "scale": 4.0}},
        {"attack": {"kind": "label_flip", "fraction": 0.34}},
        {"evaluation": {"mode": "both"}, "data": {"client_eval_fraction": 0.2}},
    ],
    ids=["secagg", "local_dp", "central_dp", "sign_flip", "label_flip", "federated_eval"],
)
def test_every_round_type_gives_the_in_process_results(
    cluster: Cluster, sections: dict[str, Any]
) -> None:
    cfg = tiny_config(**sections)
    local, _ = _rounds(cfg)
    remote, _ = _rounds(_on_ray(cfg))
    _assert_same_rounds(local, remote)
    assert all(r["metrics"]["clients_completed"] == 4 for r in remote)
    if "evaluation" in sections:  # the clients' evaluations came back from the actors
        assert all(r["eval"]["federated_accuracy"] is not None for r in remote)


@pytest.mark.parametrize(
    "sections",
    [
        {"client": {"momentum": 0.9}},
        {
            "privacy": {
                "mode": "local",
                "noise_multiplier": 1.3,
                "max_grad_norm": 0.7,
                "delta": 1e-3,
            }
        },
    ],
    ids=["sgd_momentum", "local_dp"],
)
def test_actors_that_train_cohorts_give_the_in_process_results(
    cluster: Cluster, sections: dict[str, Any]
) -> None:
    # the engines compose: each actor trains its clients of a round as cohorts of 2
    cfg = tiny_config(**sections)
    local, _ = _rounds(cfg)
    remote, _ = _rounds(_on_ray(cfg, actor_engine="cohort", cohort_size=2))
    _assert_same_rounds(local, remote)
    assert all(r["metrics"]["clients_completed"] == 4 for r in remote)


def test_attacks_change_the_model_the_same_way_on_both_engines(cluster: Cluster) -> None:
    """The attacked runs above equal in-process runs; this checks the attack did act on Ray
    (so that equality is not that of two unattacked runs)."""
    clean, _ = _rounds(_on_ray(tiny_config()), rounds=1)
    for attack in ({"kind": "sign_flip", "fraction": 0.34, "scale": 4.0}, {"kind": "label_flip"}):
        attacked, _ = _rounds(_on_ray(tiny_config(attack={**attack, "fraction": 0.34})), rounds=1)
        gap = (attacked[0]["params"] - clean[0]["params"]).norm()
        assert float(gap) > 1e-3, attack


def test_user_model_and_data_functions_travel_to_the_actors(cluster: Cluster) -> None:
    import numpy as np

    from fedguard.data.dataset import ArrayDataset, FederatedDataset

    def my_data() -> FederatedDataset:
        rng = np.random.default_rng(0)

        def blob(n: int, shift: float) -> ArrayDataset:
            x = rng.normal(size=(n, 4)).astype(np.float32)
            return ArrayDataset(x, (x[:, 0] + shift > 0).astype(np.int64))

        return FederatedDataset({"a": blob(50, 0.5), "b": blob(80, -0.5)}, blob(60, 0.0), 2)

    def my_model(input_shape, num_classes):  # noqa: ANN001, ANN202 - a user's builder
        return torch.nn.Sequential(
            torch.nn.Linear(input_shape[0], 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes)
        )

    cfg = tiny_config(data={"num_clients": 2}, server={"clients_per_round": 2})
    runs = []
    for config in (cfg, _on_ray(cfg)):
        exp = Experiment(config_mod.validate(config), model_fn=my_model, data_fn=my_data)
        try:
            params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
            for r in (1, 2):
                result = exp.driver.fit_round(r, params, state)
                params, state = result.params, result.state
                assert result.metrics["clients_completed"] == 2
            runs.append(params)
        finally:
            exp.close()
    assert runs[0].numel() == 4 * 8 + 8 + 8 * 2 + 2
    torch.testing.assert_close(runs[1], runs[0], rtol=0.0, atol=ATOL)


# ------------------------------------------------------------------------------------- failures


def test_a_dying_actor_fails_its_clients_for_the_round_and_is_replaced(cluster: Cluster) -> None:
    # client 2 crashes its actor in round 2; that round goes on with the other actor's clients
    trainer = {"trainer": f"{HERE}:DyingTrainer", "trainer_options": {"victim": 2, "round": 2}}
    cfg = tiny_config(client=trainer, server={"clients_per_round": 6})
    exp = Experiment(config_mod.validate(_on_ray(cfg)))
    try:
        pool = exp.transport
        assert isinstance(pool, ray_engine.RayTransport)
        victim_actor = pool.actor_of(2)
        mates = {c for c in range(6) if pool.actor_of(c) == victim_actor}
        params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
        results = []
        for r in (1, 2, 3):
            result = exp.driver.fit_round(r, params, state)
            params, state = result.params, result.state
            results.append(result)
        assert results[0].metrics["clients_completed"] == 6
        failed = {cid for cid, _ in results[1].problems}
        # client 2 and the clients of its batch not answered before the crash
        assert 2 in failed and failed <= mates
        assert results[1].metrics["clients_completed"] == 6 - len(failed) >= 3
        assert all("Ray actor died" in why for _, why in results[1].problems)
        assert pool.replaced == 1 and len(pool.nodes) == 2
        assert results[2].metrics["clients_completed"] == 6  # the full pool again
        assert bool(torch.isfinite(params).all())
    finally:
        exp.close()


def test_clients_not_done_by_the_deadline_time_out(cluster: Cluster, tmp_path) -> None:
    # client 1 (actor 1) waits for a file written after the exchange; the deadline is 4 s
    release = tmp_path / "release"
    state: dict[int, dict[str, torch.Tensor]] = {3: {"calls": torch.tensor(5.0)}}
    pool = ray_engine.RayTransport(
        EchoClients(slow=[1], release=release),
        list(range(4)),
        state,
        ray_engine.PoolSettings(actors=2),
    )
    try:
        assert [pool.actor_of(c) for c in range(4)] == [0, 1, 0, 1]
        out = pool.exchange({0: b"a", 1: b"b", 2: b"raise", 3: b"d"}, deadline_s=4.0)
        release.touch()
        assert [o.client_id for o in out] == [0, 1, 2, 3]  # the requests' order
        assert isinstance(out[0], Delivered) and out[0].payload == b"0:a"
        assert isinstance(out[1], Failed) and out[1].kind is FailureKind.TIMEOUT
        assert isinstance(out[2], Failed) and out[2].kind is FailureKind.ERROR
        assert out[2].reason == "ValueError: bad request"
        # client 3, behind the slow client on its actor, missed the deadline: its state is kept
        assert isinstance(out[3], Failed) and out[3].kind is FailureKind.TIMEOUT
        assert float(state[3]["calls"]) == 5.0
        # the state travels with the request and comes back changed (none: none sent back)
        assert float(state[0]["calls"]) == 1.0 and 1 not in state and 2 not in state
        # the next exchange reaches every client, client 3 with its kept state
        out = pool.exchange({1: b"e", 3: b"f"}, deadline_s=None)
        assert [o.payload for o in out if isinstance(o, Delivered)] == [b"1:e", b"3:f"]
        assert float(state[3]["calls"]) == 6.0 and float(state[1]["calls"]) == 1.0
    finally:
        release.touch()
        pool.close()


def test_a_large_exchange_is_sent_in_batches_of_bounded_size(
    cluster: Cluster, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a batch holds at most 5 request bytes here: each actor gets its 6 clients 2 at a time
    monkeypatch.setattr(ray_engine, "MAX_BATCH_BYTES", 5)
    state: dict[int, dict[str, torch.Tensor]] = {}
    pool = ray_engine.RayTransport(
        EchoClients(slow=[], release=tmp_path / "unused"), list(range(12)), state
    )
    try:
        requests = {cid: b"ab" for cid in reversed(range(12))}
        batches = list(pool._batches([0, 2, 4, 6, 8, 10], requests))
        assert [[cid for cid, _, _ in b] for b in batches] == [[0, 2], [4, 6], [8, 10]]
        out = pool.exchange(requests, deadline_s=None)
        assert [o.client_id for o in out] == list(reversed(range(12)))
        assert [o.payload for o in out if isinstance(o, Delivered)] == [
            f"{cid}:ab".encode() for cid in reversed(range(12))
        ]
        assert sorted(state) == list(range(12))
    finally:
        pool.close()


# ------------------------------------------------------------------------- refused before round 1


def test_a_model_function_that_cannot_be_pickled_is_refused(cluster: Cluster) -> None:
    lock = threading.Lock()

    def model_fn(input_shape, num_classes):  # noqa: ANN001, ANN202 - a user's builder
        with lock:
            return torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes),
            )

    cfg = config_mod.validate(_on_ray(tiny_config()))
    with pytest.raises(ConfigError, match=r"the model function \(model_fn\) cannot be pickled"):
        Experiment(cfg, model_fn=model_fn)


def test_a_pool_larger_than_the_cluster_is_refused(cluster: Cluster) -> None:
    cfg = config_mod.validate(_on_ray(tiny_config(), actors=3))
    with pytest.raises(
        ConfigError, match="runtime.actors = 3 .* do not fit the Ray cluster's 2 CPUs"
    ):
        Experiment(cfg)


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"actors": 2}, 'runtime.actors is set but runtime.kind = "inprocess"'),
        ({"kind": "ray", "address": "head node"}, 'runtime.address: "auto" or HOST:PORT'),
        ({"kind": "ray", "cpus_per_actor": 0}, "runtime.cpus_per_actor: Input should be greater"),
        ({"kind": "ray", "cohort_size": 4}, "applies to the cohort engine only"),
        ({"kind": "cohort", "latency": {"mean_s": 2.0}}, "runtime.latency is simulated"),
    ],
)
def test_bad_runtime_keys_are_refused(runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.validate(tiny_config(runtime=runtime))


def test_a_scaffold_run_resumes_on_ray_as_it_would_in_process(cluster: Cluster, tmp_path) -> None:
    """Two rounds in-process, the third resumed on Ray (client state from the checkpoint)."""
    cfg = tiny_config(server={"strategy": "scaffold"})
    fedguard.run(cfg, out=tmp_path / "full", progress=False)
    fedguard.run(
        {**cfg, "experiment": {**cfg["experiment"], "rounds": 2}},
        out=tmp_path / "cut",
        progress=False,
    )
    fedguard.run(_on_ray(cfg), out=tmp_path / "cut", resume=True, progress=False)
    full, cut = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "cut")
    assert [r["test_loss"] for r in cut] == pytest.approx([r["test_loss"] for r in full], abs=ATOL)
    torch.testing.assert_close(
        _final_params(tmp_path / "cut"), _final_params(tmp_path / "full"), rtol=0.0, atol=ATOL
    )


def test_runtime_flags_are_config_overrides() -> None:
    from fedguard import cli

    def runtime(*flags: str) -> config_mod.RuntimeSection:
        args = cli._parser().parse_args(["run", "x.toml", *flags])
        return config_mod.validate(
            config_mod.apply_overrides(tiny_config(), cli._runtime_overrides(args))
        ).runtime

    assert runtime().kind == "inprocess"
    assert runtime("--runtime", "ray") == config_mod.RuntimeSection(kind="ray")
    assert runtime("--address", "10.0.0.5:6379") == config_mod.RuntimeSection(
        kind="ray", address="10.0.0.5:6379"
    )
    assert runtime("--runtime", "ray", "--address", "auto").address == "auto"
    with pytest.raises(ConfigError, match="--address joins a Ray cluster; it needs --runtime ray"):
        runtime("--runtime", "inprocess", "--address", "auto")


def test_the_cli_joins_a_running_cluster(cluster: Cluster, tmp_path) -> None:
    """``fedguard run FILE --address HOST:PORT``, in a new process, joins the cluster and gives
    the in-process run's results."""
    ray_engine.release_idle_actors()  # the cluster's CPUs for the new process's actors
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        '[experiment]\nname = "cli"\nseed = 3\nrounds = 2\n'
        "[data]\nnum_clients = 4\nsynthetic_samples = 200\nsynthetic_shape = [1, 4, 4]\n"
        'synthetic_classes = 2\n[model]\nname = "logistic_regression"\n'
    )
    joined = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "run", str(cfg), "--quiet"]
        + ["--out", str(tmp_path / "ray"), "--address", cluster.address]
        + ["--set", "runtime.actors=1"],  # one new worker process is enough here
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert joined.returncode == 0, joined.stderr[-2000:]
    fedguard.run(cfg, out=tmp_path / "local", progress=False)
    written = config_mod.load(tmp_path / "ray" / "config.toml").runtime
    assert written == config_mod.RuntimeSection(kind="ray", actors=1, address=cluster.address)
    rows = [metric_rows(tmp_path / name) for name in ("ray", "local")]
    assert [r["test_loss"] for r in rows[0]] == pytest.approx(
        [r["test_loss"] for r in rows[1]], abs=ATOL
    )
    assert [r["clients_completed"] for r in rows[0]] == [4, 4]
