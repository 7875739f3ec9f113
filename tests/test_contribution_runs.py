"""Contribution scores in real runs (issue 18, phase 2): digits, nine clients, two free riders
and one noisy client, scored through the run's own aggregation and optimizer step.

The setup (the ranking depends on it): scikit-learn's 8x8 digits (1797 images, 64 features
scaled to [0, 1], 10 classes), 1000 training images dealt IID to nine clients (111 or 112
each), 300 validation and 497 test images; a multinomial logistic regression; every client runs
one epoch of SGD (learning rate 0.1, batches of 16) per round; FedAvg, all nine clients every
round. ``[attack] kind = "free_rider"`` makes two clients (drawn with the attack's seed) send a
zero update while claiming their real example count; the data function shuffles all labels of
one more client (a noisy client, chosen among the others). The utility is the negative
validation loss: a zero update dilutes the weighted mean (a shorter step towards the optimum)
and shuffled labels pull it the wrong way, so the three have negative marginal value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedguard
from fedguard.algorithms import attacks
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.data.dataset import ArrayDataset, FederatedDataset
from fedguard.experiment import config as config_mod

CLIENTS = 9
ATTACK_SEED = 5
FREE_RIDERS = tuple(attacks.choose_malicious(list(range(CLIENTS)), 2 / CLIENTS, ATTACK_SEED))
NOISY = next(c for c in range(CLIENTS) if c not in FREE_RIDERS)
BAD = {*FREE_RIDERS, NOISY}


def digits_data() -> FederatedDataset:
    """Nine IID clients of digits, one with all its labels shuffled; validation and test sets."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    train_x, train_y = x[:1000], y[:1000]
    clients: dict[str, ArrayDataset] = {}
    for i, part in enumerate(np.array_split(np.arange(1000), CLIENTS)):
        labels = train_y[part]
        if i == NOISY:
            shuffled = attacks_data.shuffle_labels(
                torch.from_numpy(labels),
                probability=1.0,
                generator=torch.Generator().manual_seed(7),
            )
            labels = shuffled.numpy()
        clients[f"client_{i}"] = ArrayDataset(train_x[part], labels)
    return FederatedDataset(
        clients,
        ArrayDataset(x[1300:], y[1300:]),
        10,
        val=ArrayDataset(x[1000:1300], y[1000:1300]),
    )


def config(method: str, rounds: int = 4, **contribution: Any) -> dict[str, Any]:
    return {
        "experiment": {"name": "contrib", "seed": 1, "rounds": rounds},
        "data": {"num_clients": CLIENTS},
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg"},
        "attack": {"kind": "free_rider", "fraction": 2 / CLIENTS, "seed": ATTACK_SEED},
        "contribution": {"method": method, **contribution},
    }


def run(tmp_path: Path, name: str, cfg: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return fedguard.run(cfg, out=tmp_path / name, data_fn=digits_data, progress=False, **kwargs)


def read(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def last_three(cumulative: dict[str, float]) -> set[int]:
    return {int(c) for c in sorted(cumulative, key=cumulative.__getitem__)[:3]}


@pytest.mark.plots  # its pictures are drawn (conftest)
@pytest.mark.parametrize("method", ["gtg_shapley", "leave_one_out"])
def test_free_riders_and_the_noisy_client_rank_last_are_flagged_and_get_the_floor(
    tmp_path: Path, method: str
) -> None:
    summary = run(tmp_path, method, config(method, flag_rule="score", flag_patience=2))
    folder = tmp_path / method
    scores = read(folder, "contributions.json")
    assert summary["attack"]["kind"] == "free_rider"
    assert tuple(summary["attack"]["malicious"]) == FREE_RIDERS == (7, 8) and NOISY == 0
    assert last_three(scores["cumulative"]) == BAD
    # measured (4 rounds): the three bad clients' cumulative scores lie in -0.074..-0.034, the
    # honest ones' in 0.013..0.026 (leave-one-out) and 0.069..0.104 (GTG-Shapley)
    worst_honest = min(v for c, v in scores["cumulative"].items() if int(c) not in BAD)
    best_bad = max(v for c, v in scores["cumulative"].items() if int(c) in BAD)
    assert best_bad < -0.02 and worst_honest > 0.01
    # every bad client scored below 0 in rounds 1 and 2, so patience 2 flags them after round 2
    for record in scores["rounds"][:2]:
        assert all(record["scores"][str(c)] < 0 for c in BAD)
    contribution = summary["contribution"]
    assert contribution["flagged"] == sorted(BAD)
    floor_share = 0.1 * 100.0 / CLIENTS
    rewards = {int(c): v for c, v in contribution["rewards"].items()}
    assert math.fsum(rewards.values()) == pytest.approx(100.0, abs=1e-9)
    for c in BAD:
        assert rewards[c] == pytest.approx(floor_share, abs=1e-12)
    assert min(v for c, v in rewards.items() if c not in BAD) > 10.0
    # the cost: leave-one-out evaluates K + 1 = 10 coalitions a round; GTG-Shapley measured
    # 352..403 of exact Shapley's 512 (its truncations rarely fire on this smooth utility)
    per_round = [r["evaluations"] for r in scores["rounds"]]
    assert contribution["evaluations"] == sum(per_round)
    if method == "leave_one_out":
        assert per_round == [10, 10, 10, 10]
    else:
        assert all(120 <= n <= 250 for n in per_round)
    assert contribution["seconds"] == pytest.approx(
        math.fsum(r["seconds"] for r in scores["rounds"])
    )
    assert (folder / "plots" / "contributions.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["contribution_evaluations"] for r in rows] == per_round


def test_cosine_scores_a_free_rider_zero_without_any_evaluation(tmp_path: Path) -> None:
    summary = run(tmp_path, "cos", config("cosine", rounds=2))
    scores = read(tmp_path / "cos", "contributions.json")
    for record in scores["rounds"]:
        assert record["evaluations"] == 0
        assert [record["scores"][str(c)] for c in FREE_RIDERS] == [0.0, 0.0]
        honest = [v for c, v in record["scores"].items() if int(c) not in BAD]
        assert min(honest) > 0.5 > record["scores"][str(NOISY)]  # measured: 0.84..0.92 vs 0.13
    assert summary["contribution"]["evaluations"] == 0


def test_exact_shapley_is_efficient_and_symmetric_on_a_real_run(tmp_path: Path) -> None:
    run(tmp_path, "exact", config("exact_shapley", rounds=2))
    scores = read(tmp_path / "exact", "contributions.json")
    assert [r["round"] for r in scores["rounds"]] == [1, 2]
    for record in scores["rounds"]:
        assert record["evaluations"] == 2**CLIENTS
        gain = record["utility_all"] - record["utility_empty"]
        assert gain > 0.05  # measured: 0.1031 and 0.0876
        assert math.fsum(record["scores"].values()) == pytest.approx(gain, abs=1e-9)
        # the two free riders send the same (zero) update with the same weight (111 examples)
        a, b = (record["scores"][str(c)] for c in FREE_RIDERS)
        assert a == pytest.approx(b, abs=1e-12) and a < 0
    assert scores["rounds"][1]["utility_empty"] == scores["rounds"][0]["utility_all"]


def test_resume_keeps_the_ledger_flags_and_round_records(tmp_path: Path) -> None:
    cfg = config("leave_one_out", rounds=4, flag_rule="score", flag_patience=3)
    run(tmp_path, "full", cfg)
    run(tmp_path, "cut", config("leave_one_out", rounds=2, flag_rule="score", flag_patience=3))
    resumed = run(tmp_path, "cut", cfg, resume=True)
    full, cut = (read(tmp_path / n, "contributions.json") for n in ("full", "cut"))
    assert cut["cumulative"] == full["cumulative"]  # the exact floats
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full["rounds"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in cut["rounds"]] == strip
    # flagged after round 3 (patience 3): only possible if rounds 1 and 2 were restored
    assert resumed["contribution"]["flagged"] == sorted(BAD)
    assert resumed["contribution"]["evaluations"] == 40


def test_exclude_flagged_leaves_them_out_of_later_aggregates(tmp_path: Path) -> None:
    # Threshold -0.005, not 0: once the three are out, six IID honest clients are redundant
    # and their leave-one-out scores hover around 0 (measured: -0.0033..0.0025 in rounds 2-3),
    # while the three bad clients score -0.0121..-0.0090 in round 1.
    flags = {"flag_rule": "score", "flag_patience": 1, "flag_threshold": -0.005}
    summary = run(tmp_path, "ex", config("leave_one_out", rounds=3, exclude_flagged=True, **flags))
    folder = tmp_path / "ex"
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_excluded"] for r in rows] == [0, 3, 3]
    assert [r["clients_completed"] for r in rows] == [9, 6, 6]
    scores = read(folder, "contributions.json")
    assert set(scores["rounds"][0]["scores"]) == {str(c) for c in range(CLIENTS)}
    for record in scores["rounds"][1:]:
        assert set(map(int, record["scores"])) == set(range(CLIENTS)) - BAD
        assert record["evaluations"] == 7  # K + 1 with K = 6
    contribution = summary["contribution"]
    assert contribution["excluded"] == {str(c): [2, 3] for c in sorted(BAD)}
    assert contribution["flagged"] == sorted(BAD)
    kept = run(tmp_path, "kept", config("leave_one_out", rounds=3, **flags))
    # without the three the mean takes the honest clients' full step (measured: test accuracy
    # 0.592 against 0.489, test loss 1.989 against 2.066)
    assert summary["test_loss"] < kept["test_loss"]
    assert summary["test_accuracy"] > kept["test_accuracy"] + 0.05


def test_noisy_client_attack_shuffles_that_share_of_its_labels() -> None:
    from fedguard.experiment.assembly import Experiment

    cfg = config("none")
    cfg["attack"] = {"kind": "noisy_client", "fraction": 1 / CLIENTS, "seed": 2, "label_noise": 0.5}
    cfg.pop("contribution")
    exp = Experiment(config_mod.validate(cfg), data_fn=digits_data)
    clean = Experiment(config_mod.validate(config("none") | {"attack": {}}), data_fn=digits_data)
    (plan,) = exp.attacks
    (noisy,) = plan.malicious
    before, after = clean.fed.clients[noisy].train_y, exp.fed.clients[noisy].train_y
    changed = float((before != after).double().mean())
    assert 0.3 < changed < 0.6  # about label_noise * (1 - 1/10) = 0.45 of the labels move
    assert torch.equal(torch.bincount(before, minlength=10), torch.bincount(after, minlength=10))
    assert exp.attack_summary() == {
        "kind": "noisy_client",
        "fraction": 1 / CLIENTS,
        "seed": 2,
        "malicious": [noisy],
        "by_kind": {"noisy_client": [noisy]},
    }


def test_refusals_before_round_1(tmp_path: Path) -> None:
    secure = config("gtg_shapley")
    secure.pop("attack")
    secure["secure_aggregation"] = {"enabled": True, "clip_norm": 1.0}
    with pytest.raises(config_mod.ConfigError, match="secure aggregation hides"):
        config_mod.validate(secure)
    big = config("exact_shapley")
    big["data"] = {"num_clients": 13}
    big["attack"]["fraction"] = 0.2
    with pytest.raises(config_mod.ConfigError, match="up to 13 clients per round is above"):
        config_mod.validate(big)
    big["server"]["clients_per_round"] = 12
    assert config_mod.validate(big).contribution.method == "exact_shapley"
    idle = config("none", flag_patience=2)
    with pytest.raises(config_mod.ConfigError, match="contribution.flag_patience is set"):
        config_mod.validate(idle)
    synthetic = {
        "experiment": {"rounds": 2},
        "data": {"num_clients": 4, "synthetic_samples": 200, "synthetic_shape": [1, 4, 4]},
        "model": {"name": "logistic_regression"},
        "contribution": {"method": "leave_one_out"},
    }
    with pytest.raises(config_mod.ConfigError, match="'synthetic' has none"):
        fedguard.run(synthetic, out=tmp_path / "syn", progress=False)
    assert not (tmp_path / "syn" / "metrics.jsonl").exists()


# ---- sub-models of coalitions (fedguard.protocol.coalitions), by hand ------------------------


def replies_of(updates: torch.Tensor, sizes: list[int]) -> list[Any]:
    from fedguard.protocol import messages

    return [
        messages.FitReply(1, i, u.to(torch.float32), n)
        for i, (u, n) in enumerate(zip(updates, sizes, strict=True))
    ]


def test_a_sub_model_uses_the_rule_and_optimizer_without_advancing_the_state() -> None:
    from fedguard.protocol import coalitions, fedopt
    from fedguard.protocol.strategy import StrategyKind

    updates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    replies = replies_of(updates, [10, 30, 60])
    strategy = fedopt.create(
        StrategyKind.FEDAVGM, client_config={}, num_clients=3, server_lr=0.5, server_momentum=0.9
    )
    params = torch.tensor([1.0, -1.0])
    state = strategy.init(params)
    state = strategy.aggregate(state, params, replies, round_=1)[0]  # momentum [1.9, 2.4]
    one = coalitions.sub_model(strategy, state, params, replies[:2], round_=2)
    again = coalitions.sub_model(strategy, state, params, replies[:2], round_=2)
    # mean of the two (weights 10, 30) = [0.25, 1.5]; momentum 0.9 * [1.9, 2.4] + that
    # = [1.96, 3.66]; step 0.5 of it from [1, -1]
    assert one.tolist() == pytest.approx([1.98, 0.83], abs=1e-6)
    assert torch.equal(one, again)


def test_a_robust_rules_too_small_coalition_falls_back_to_the_mean() -> None:
    from fedguard.algorithms import robust
    from fedguard.protocol import coalitions, fedopt
    from fedguard.protocol.strategy import StrategyKind

    updates = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])
    replies = replies_of(updates, [1, 1, 1, 1, 50])
    median = robust.RobustConfig(robust.RobustAggregator.MEDIAN, f=1)
    strategy = fedopt.create(
        StrategyKind.FEDAVG, client_config={}, num_clients=5, robust_rule=median
    )
    params = torch.zeros(1)
    state = strategy.init(params)
    # five updates: the median (K > 2f holds); two: below the rule's minimum, the equal mean
    assert coalitions.sub_model(strategy, state, params, replies, round_=1).item() == 3.0
    pair = coalitions.sub_model(strategy, state, params, [replies[0], replies[4]], round_=1)
    assert pair.item() == pytest.approx(50.5)


def test_central_dp_scores_the_clipped_updates_before_the_noise() -> None:
    from fedguard.protocol import coalitions, fedopt
    from fedguard.protocol.strategy import CentralDP, StrategyKind

    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_clients=4.0, seed=0)
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=4, central_dp=dp)
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 (clipped to 1) and 0.5
    replies = replies_of(updates, [10, 10])
    params = torch.zeros(2)
    state = strategy.init(params)
    model = coalitions.sub_model(strategy, state, params, replies, round_=1)
    # ([0.6, 0.8] + [0.3, 0.4]) / 4 expected clients, no noise
    assert model.tolist() == pytest.approx([0.225, 0.3], abs=1e-6)
    noised = strategy.aggregate(state, params, replies, round_=1)[1]
    assert not torch.allclose(model, noised, atol=1e-3)


def test_a_data_free_server_scores_on_its_own_data_or_refuses() -> None:
    from types import SimpleNamespace

    from fedguard.experiment.data_free import DataFreeExperiment
    from fedguard.models import registry as models

    cfg = config_mod.validate(config("leave_one_out") | {"attack": {}})
    server = SimpleNamespace(cfg=cfg, owned=None, model=None)
    with pytest.raises(config_mod.ConfigError, match="give evaluation.server_data"):
        DataFreeExperiment.contribution_utility(server)  # type: ignore[arg-type]
    model = models.build(
        "logistic_regression", framework="torch", input_shape=(4,), num_classes=2, seed=0
    )
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    server = SimpleNamespace(cfg=cfg, owned=(x, torch.tensor([0, 1])), model=model)
    utility = DataFreeExperiment.contribution_utility(server)  # type: ignore[arg-type]
    assert utility is not None
    assert utility(torch.zeros(model.spec.size)) == pytest.approx(-math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    ("name", "server", "privacy", "method"),
    [
        ("fedadam", {"strategy": "fedadam", "server_lr": 0.05}, {}, "exact_shapley"),
        ("central_dp", {}, {"mode": "central", "noise_multiplier": 0.5}, "exact_shapley"),
        ("median", {"aggregator": "median", "byzantine_f": 2}, {}, "leave_one_out"),
        ("scaffold", {"strategy": "scaffold"}, {}, "gtg_shapley"),
    ],
)
def test_scores_compose_with_optimizers_robust_rules_and_central_dp(
    tmp_path: Path, name: str, server: dict, privacy: dict, method: str
) -> None:
    cfg = config(method, rounds=2)
    cfg["server"] = {"strategy": "fedavg", **server}
    if privacy:
        cfg["privacy"] = privacy
    run(tmp_path, name, cfg)
    scores = read(tmp_path / name, "contributions.json")
    for record in scores["rounds"]:
        gain = record["utility_all"] - record["utility_empty"]
        if method == "exact_shapley":
            assert math.fsum(record["scores"].values()) == pytest.approx(gain, abs=1e-9)
    if name == "central_dp":
        # clipped updates summed over a fixed denominator: a zero update adds nothing, so a
        # free rider is a null player (exactly 0, not below it: flag_threshold = 0 does not
        # flag it); the noisy client's clipped update still lengthens the step a little and
        # scores above 0 (measured 0.0059) but below every honest client (0.028 and up)
        for record in scores["rounds"]:
            assert [record["scores"][str(c)] for c in FREE_RIDERS] == [0.0, 0.0]
        cumulative = scores["cumulative"]
        honest = [v for c, v in cumulative.items() if int(c) not in BAD]
        assert 0.0 < cumulative[str(NOISY)] < 0.5 * min(honest)
    else:
        assert last_three(scores["cumulative"]) == BAD
