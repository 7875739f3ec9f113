"""Free riders and noisy clients in one run (``attack.kind`` a list), and the GTG-Shapley
evaluation budget as a config key: the draw, what each behaviour does, and the refusals.

The run: the digits federation of ``test_contribution_runs`` (nine IID clients of scikit-learn's
8x8 digits, its noisy client's labels already shuffled by the data function; the attack's noisy
clients come on top of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_contribution_runs import CLIENTS, config, digits_data, read

import fedguard
from fedguard.algorithms import attacks
from fedguard.experiment import config as config_mod

MIX = {
    "kind": ["free_rider", "noisy_client"],
    "fraction": [2 / CLIENTS, 1 / CLIENTS],
    "seed": 3,
    "label_noise": 1.0,
}


def mixed(method: str = "leave_one_out", **contribution: Any) -> dict[str, Any]:
    cfg = config(method, rounds=2, **contribution)
    cfg["attack"] = dict(MIX)
    return cfg


def test_choose_groups_deals_one_seeded_order_out_group_after_group() -> None:
    ids = [12, 3, 7, 40, 5, 9, 1, 22, 30, 8]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    by_rank = sorted(ids)
    expected = [
        sorted(by_rank[i] for i in order[:2]),
        sorted(by_rank[i] for i in order[2:3]),
        sorted(by_rank[i] for i in order[3:6]),
    ]
    assert attacks.choose_groups(ids, [0.2, 0.1, 0.3], 4) == expected
    assert attacks.choose_malicious(ids, 0.2, 4) == expected[0]
    with pytest.raises(ValueError, match="do not fit in 10 clients"):
        attacks.choose_groups(ids, [0.6, 0.5], 4)


def test_a_mixed_run_has_disjoint_free_riders_and_noisy_clients(tmp_path: Path) -> None:
    from fedguard.experiment.assembly import Experiment

    exp = Experiment(config_mod.validate(mixed()), data_fn=digits_data)
    riders, noisy = (plan.malicious for plan in exp.attacks)
    ids = list(range(CLIENTS))
    assert list(riders) == attacks.choose_malicious(ids, 2 / CLIENTS, 3)
    assert [list(riders), list(noisy)] == attacks.choose_groups(ids, MIX["fraction"], 3)
    assert len(riders) == 2 and len(noisy) == 1 and not set(riders) & set(noisy)
    # the noisy client's labels are shuffled (label_noise 1: about 9 in 10 move), the class
    # counts kept; the free riders' and everyone else's data untouched
    clean = Experiment(config_mod.validate(config("none") | {"attack": {}}), data_fn=digits_data)
    for cid in ids:
        before, after = clean.fed.clients[cid].train_y, exp.fed.clients[cid].train_y
        if cid in noisy:
            assert float((before != after).double().mean()) > 0.7
            assert torch.equal(
                torch.bincount(before, minlength=10), torch.bincount(after, minlength=10)
            )
        else:
            assert torch.equal(before, after)
    # one round: the free riders send the global model back (a zero update), the others train
    seen: dict[int, torch.Tensor] = {}

    def spy(round_, params, state, replies):  # type: ignore[no-untyped-def]
        seen.update({r.client_id: r.update for r in replies})
        return replies, {}

    exp.driver.before_aggregate = spy
    params = exp.initial_params
    exp.driver.fit_round(1, params, exp.strategy.init(params))
    assert sorted(seen) == ids
    for cid, update in seen.items():
        assert (float(update.abs().max()) == 0.0) == (cid in riders)
    assert exp.attack_summary() == {
        "kind": ["free_rider", "noisy_client"],
        "fraction": MIX["fraction"],
        "seed": 3,
        "malicious": sorted([*riders, *noisy]),
        "by_kind": {"free_rider": list(riders), "noisy_client": list(noisy)},
    }


def test_a_mixed_run_writes_every_behaviours_ids_and_a_budgeted_gtg_keeps_it(
    tmp_path: Path,
) -> None:
    summary = fedguard.run(
        mixed("gtg_shapley", gtg_max_evaluations=25),
        out=tmp_path / "mix",
        data_fn=digits_data,
        progress=False,
    )
    by_kind = summary["attack"]["by_kind"]
    assert len(by_kind["free_rider"]) == 2 and len(by_kind["noisy_client"]) == 1
    rounds = read(tmp_path / "mix", "contributions.json")["rounds"]
    assert [r["evaluations"] <= 25 for r in rounds] == [True, True]
    assert all(r["budget_exhausted"] for r in rounds)
    assert summary["contribution"]["evaluations"] <= 50


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ({"kind": ["free_rider", "noisy_client"], "fraction": 0.2}, "must be a list of 2 shares"),
        ({"kind": ["free_rider", "noisy_client"], "fraction": [0.2]}, "must be a list of 2"),
        ({"kind": "free_rider", "fraction": [0.2, 0.1]}, "is one behaviour"),
        ({"kind": ["free_rider", "free_rider"], "fraction": [0.2, 0.1]}, "behaviour twice"),
        ({"kind": ["free_rider", "sign_flip"], "fraction": [0.2, 0.2]}, "at most one such"),
        ({"kind": ["noisy_client", "label_flip"], "fraction": [0.6, 0.5]}, "more than all"),
        ({"kind": ["free_rider", "noisy_client"], "fraction": [0.2, 0.01]}, 'no "noisy_client"'),
        ({"kind": ["free_rider", "none"], "fraction": [0.2, 0.1]}, "built-in behaviours only"),
        ({"kind": ["free_rider", "pkg.mod:name"], "fraction": [0.2, 0.1]}, "stands alone"),
        ({"kind": [], "fraction": []}, "names no behaviour"),
    ],
)
def test_mixed_attack_refusals(attack: dict[str, Any], message: str) -> None:
    cfg = config("none")
    cfg.pop("contribution")
    cfg["attack"] = attack
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.validate(cfg)


def test_mixed_data_poisoning_passes_secure_aggregation_but_a_free_rider_does_not() -> None:
    cfg = config("none")
    cfg.pop("contribution")
    cfg["secure_aggregation"] = {"enabled": True, "clip_norm": 1.0}
    cfg["attack"] = {"kind": ["noisy_client", "label_flip"], "fraction": [0.2, 0.2]}
    assert config_mod.validate(cfg).attack.kinds() == ("noisy_client", "label_flip")
    cfg["attack"] = {"kind": ["noisy_client", "free_rider"], "fraction": [0.2, 0.2]}
    with pytest.raises(config_mod.ConfigError, match='"free_rider" rewrites fit replies'):
        config_mod.validate(cfg)


def test_gtg_budget_refusals() -> None:
    with pytest.raises(config_mod.ConfigError, match="cannot pay for one GTG-Shapley permutation"):
        config_mod.validate(config("gtg_shapley", gtg_max_evaluations=9))
    assert config_mod.validate(config("gtg_shapley", gtg_max_evaluations=10))
    with pytest.raises(config_mod.ConfigError, match="does not sample"):
        config_mod.validate(config("leave_one_out", gtg_max_evaluations=40))
    with pytest.raises(config_mod.ConfigError, match="gtg_max_evaluations"):
        config_mod.validate(config("gtg_shapley", gtg_max_evaluations=2))


@pytest.mark.parametrize(
    ("method", "split", "held_out"),
    [
        ("leave_one_out", "test", True),
        ("gtg_shapley", "test", True),
        ("cosine", "test", False),
        ("none", "test", False),
        ("none", "val", True),
    ],
)
def test_a_run_that_scores_contributions_asks_for_a_validation_split(
    monkeypatch: pytest.MonkeyPatch, method: str, split: str, held_out: bool
) -> None:
    # FSDD has no official validation split and holds one out only when asked (takes 5-9)
    from fedguard.data import registry
    from fedguard.experiment import federation

    asked: dict[str, Any] = {}

    def load_dataset(name: str, **kwargs: Any) -> None:
        asked.update(kwargs)

    monkeypatch.setattr(registry, "load_dataset", load_dataset)
    cfg = config(method)
    cfg.pop("attack")
    if method == "none":
        cfg.pop("contribution")
    cfg["evaluation"] = {"split": split}
    federation.load_data(config_mod.validate(cfg))
    assert asked["validation"] is held_out
