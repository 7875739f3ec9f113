"""Robust aggregation and simulated attacks in whole runs: refusals, defences, resume, the wire."""

from __future__ import annotations

import re

import pytest
import torch

import fedguard
from conftest import metric_rows, ten_iid_config
from fedguard.algorithms import attacks, robust
from fedguard.experiment import assembly, checkpoint
from fedguard.experiment.config import ConfigError, validate
from fedguard.protocol import messages
from fedguard.protocol.strategy import ServerState
from fedguard.simulation import attack
from fedguard.simulation.inprocess import InProcessTransport


def _config(**sections: dict) -> dict:
    """Ten clients, all of them every round: 2 attackers at the default fraction 0.2."""
    return ten_iid_config("robust", **sections)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {
                "server": {"aggregator": "krum", "byzantine_f": 2},
                "secure_aggregation": {"enabled": True, "clip_norm": 1.0},
            },
            'server.aggregator = "krum" compares individual updates, which secure aggregation '
            "hides",
        ),
        (
            {
                "server": {"aggregator": "median", "byzantine_f": 2},
                "privacy": {"mode": "central", "noise_multiplier": 1.0},
            },
            "calibrated for the mean's sensitivity",
        ),
        (
            {"server": {"aggregator": "krum", "byzantine_f": 4}},
            'server.byzantine_f=4 is too large for server.aggregator = "krum" with 10 clients '
            "per round: it needs K > 2f + 2, so f <= 3",
        ),
        (
            {"server": {"aggregator": "bulyan"}},
            "needs server.byzantine_f, the number of Byzantine clients per round it must "
            "tolerate (0..1 with 10 clients per round, as it needs K >= 4f + 3)",
        ),
        (
            {
                "attack": {"kind": "alie"},
                "secure_aggregation": {"enabled": True, "clip_norm": 1.0},
            },
            "rewrites fit replies, which secure aggregation masks",
        ),
        ({"server": {"clipping_radius": 2.0}}, "server.clipping_radius only applies to a robust"),
    ],
)
def test_incompatible_choices_are_refused_with_the_reason(sections, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_config(**sections))


@pytest.mark.parametrize(
    "sections",
    [
        {"secure_aggregation": {"enabled": True, "clip_norm": 1.0}},
        {"privacy": {"mode": "central", "noise_multiplier": 1e-6, "clip_norm": 1.0}},
    ],
    ids=["secure_aggregation", "central_dp"],
)
def test_norm_bounding_bounds_the_step_under_secure_aggregation_and_central_dp(sections) -> None:
    """Where the server never sees (secure aggregation) or re-clips (central DP) the updates, the
    norm bound still holds: each update is clipped to 0.01 (not to the clip 1.0), so the round's
    step, a mean of ten of them, is at most 0.01 long, while without the bound it is longer."""
    bound = 0.01
    server = {"aggregator": "norm_bounding", "byzantine_f": 2, "norm_bound": bound}

    def step(**server_section) -> float:
        exp = assembly.Experiment(validate(_config(server=server_section, **sections)))
        params = exp.initial_params
        result = exp.driver.fit_round(1, params, exp.strategy.init(params))
        assert result.metrics["clients_completed"] == 10
        return float((result.params.double() - params.double()).norm())

    bounded, free = step(**server), step()
    # 1e-4: the fixed-point rounding of secure aggregation, and the 1e-6 noise of central DP
    assert 0.5 * bound < bounded <= bound + 1e-4
    assert free > 3 * bound


@pytest.fixture(scope="module")
def fedavg_accuracy(tmp_path_factory) -> float:
    """Clean FedAvg on the shared seeded task."""
    out = tmp_path_factory.mktemp("fedavg") / "run"
    return fedguard.run(_config(), out=out, progress=False)["test_accuracy"]


@pytest.mark.parametrize("kind", [k.value for k in robust.RobustAggregator])
def test_without_attackers_every_rule_is_within_3_points_of_fedavg(
    kind, fedavg_accuracy, tmp_path
) -> None:
    server = {"aggregator": kind, "byzantine_f": 1 if kind == "bulyan" else 2}
    if kind == "norm_bounding":
        server["norm_bound"] = 1.0
    if kind == "centered_clipping":
        server["clipping_radius"] = 1.0
    rule = fedguard.run(_config(server=server), out=tmp_path / kind, progress=False)
    assert fedavg_accuracy >= 0.95
    assert abs(rule["test_accuracy"] - fedavg_accuracy) <= 0.03, (kind, rule, fedavg_accuracy)


def test_sign_flipping_wrecks_fedavg_and_robust_rules_hold(tmp_path) -> None:
    strong = {"kind": "sign_flip", "scale": 10.0}
    accuracy = {}
    for rule in ("mean", "krum", "median", "trimmed_mean"):
        server = {} if rule == "mean" else {"aggregator": rule, "byzantine_f": 2}
        cfg = _config(server=server, attack=strong)
        accuracy[rule] = fedguard.run(cfg, out=tmp_path / rule, progress=False)["test_accuracy"]
    clean = fedguard.run(_config(), out=tmp_path / "clean", progress=False)["test_accuracy"]
    assert clean >= 0.95
    assert accuracy["mean"] <= 0.2  # 8 honest u against 2 x (-10 u): the mean walks backwards
    for rule in ("krum", "median", "trimmed_mean"):
        assert accuracy[rule] >= clean - 0.03, (rule, accuracy)


def test_resume_with_centered_clipping_continues_exactly(tmp_path) -> None:
    server = {
        "strategy": "fedadam",
        "server_lr": 0.05,
        "aggregator": "centered_clipping",
        "byzantine_f": 2,
        "clipping_radius": 0.05,  # small enough that the clip binds every round
    }
    attack_section = {"kind": "gaussian", "std": 0.5}
    full = _config(experiment={"rounds": 4}, server=server, attack=attack_section)
    fedguard.run(full, out=tmp_path / "full", progress=False)
    fedguard.run(
        _config(experiment={"rounds": 2}, server=server, attack=attack_section),
        out=tmp_path / "part",
        progress=False,
    )
    fedguard.run(full, out=tmp_path / "part", resume=True, progress=False)
    a = checkpoint.latest(tmp_path / "full" / "checkpoints").tensors
    b = checkpoint.latest(tmp_path / "part" / "checkpoints").tensors
    assert torch.equal(a["params"], b["params"])
    reference = a["server.robust.reference"]
    assert reference.shape == a["params"].shape and float(reference.norm()) > 0
    assert torch.equal(reference, b["server.robust.reference"])
    # A checkpoint written before robust aggregation existed still loads, with no reference.
    old = {k.removeprefix("server."): v for k, v in a.items() if k.startswith("server.")}
    del old["robust.reference"]
    assert ServerState.from_tensors(old).robust_reference.numel() == 0


def test_a_nan_attacker_is_rejected_by_the_driver_and_logged(tmp_path, monkeypatch) -> None:
    def nan_poison(config):
        return lambda honest, own, generator: torch.full_like(own, float("nan"))

    monkeypatch.setattr(attack, "model_poison", nan_poison)
    cfg = _config(server={"aggregator": "median", "byzantine_f": 2}, attack={"kind": "boost"})
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    rows = metric_rows(tmp_path / "r")
    assert [r["clients_rejected"] for r in rows] == [2, 2, 2, 2]
    assert [r["clients_completed"] for r in rows] == [8, 8, 8, 8]
    assert summary["test_accuracy"] >= 0.95
    malicious = summary["attack"]["malicious"]
    assert malicious == attacks.choose_malicious(range(10), 0.2, 1) and len(malicious) == 2
    log = (tmp_path / "r" / "run.log").read_text()
    for cid in malicious:
        assert f"client {cid} rejected: update contains NaN or infinite values" in log


def test_model_poisoning_replies_are_re_encoded_from_the_honest_round() -> None:
    honest_updates = {0: [1.0, 2.0], 1: [3.0, 0.0], 2: [5.0, 4.0]}

    def client(cid: int, payload: bytes) -> bytes:
        task = messages.decode(payload, messages.FitTask)
        update = torch.tensor(honest_updates[cid])
        return messages.encode(messages.FitReply(task.round, cid, update, 10, {"train_loss": 1.0}))

    config = attacks.AttackConfig(attacks.Attack.IPM, epsilon=0.5)
    transport = attack.ModelPoisoning(
        InProcessTransport(client, [0, 1, 2]), [2], attack.model_poison(config), seed=0
    )
    params = torch.zeros(2)
    requests = {cid: messages.encode(messages.FitTask(7, cid, params, {}, {})) for cid in (0, 1, 2)}
    replies = [messages.decode(o.payload) for o in transport.exchange(requests, deadline_s=None)]
    assert [r.client_id for r in replies] == [0, 1, 2]
    assert replies[0].update.tolist() == [1.0, 2.0]
    assert replies[2].update.tolist() == [-1.0, -0.5]  # -0.5 * mean of the two honest updates
    assert (replies[2].round, replies[2].num_examples) == (7, 10)


def test_backdoor_success_is_reported_and_high_without_defence(tmp_path) -> None:
    cfg = _config(
        experiment={"rounds": 6},
        attack={"kind": "backdoor", "target_label": 0, "trigger_size": 2, "fraction": 0.3},
        evaluation={"every": 1},
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    rows = metric_rows(tmp_path / "r")
    assert all(r["backdoor_success"] is not None for r in rows)
    assert summary["backdoor_success"] == rows[-1]["backdoor_success"] >= 0.8
    assert summary["test_accuracy"] >= 0.9
    clean = fedguard.run(_config(), out=tmp_path / "clean", progress=False)
    assert clean["backdoor_success"] is None and clean["attack"] is None


def test_label_flipping_rewrites_only_the_malicious_clients_labels() -> None:
    cfg = validate(_config(attack={"kind": "label_flip"}))
    clean = assembly.Experiment(validate(_config()))
    exp = assembly.Experiment(cfg)
    assert len(exp.attacks) == 1 and len(exp.attacks[0].malicious) == 2
    for cid, data in exp.fed.clients.items():
        before = clean.fed.clients[cid].train_y
        expected = 2 - before if cid in exp.attacks[0].malicious else before
        assert torch.equal(data.train_y, expected)


def test_bucketed_median_holds_against_sign_flipping_and_resumes_exactly(tmp_path) -> None:
    """Ten clients in five random pairs a round: two attackers spoil at most two of five bucket
    means, which the median outvotes; the round-seeded shuffle repeats on resume."""
    server = {"aggregator": "median", "byzantine_f": 2, "bucket_size": 2}
    strong = {"kind": "sign_flip", "scale": 10.0}
    full = _config(server=server, attack=strong)
    summary = fedguard.run(full, out=tmp_path / "full", progress=False)
    assert summary["test_accuracy"] >= 0.92
    part = _config(experiment={"rounds": 2}, server=server, attack=strong)
    fedguard.run(part, out=tmp_path / "part", progress=False)
    fedguard.run(full, out=tmp_path / "part", resume=True, progress=False)
    a = checkpoint.latest(tmp_path / "full" / "checkpoints").tensors["params"]
    b = checkpoint.latest(tmp_path / "part" / "checkpoints").tensors["params"]
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=re.escape("K > 2f on K = ceil(clients / 4) bucket")):
        validate(_config(server={**server, "bucket_size": 4}))
