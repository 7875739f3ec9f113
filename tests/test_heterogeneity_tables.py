"""How the heterogeneity benchmark turns its runs into the README's rows and medians.

The optimizer table's choices rest on three rules of ``benchmarks/heterogeneity.py``: a cell's
row is the grid value with the best *validation* accuracy (never the best test accuracy);
its rounds to target count against 95% of the picked IID run of the same strategy, seed and
length (the label grid's IID run for the quantity and feature skew rows); and runs of
different lengths never share a median. Each is checked here on hand-made runs against values
worked out in the test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def het():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling digits_task
    try:
        spec = importlib.util.spec_from_file_location(
            "heterogeneity_bench", BENCH / "heterogeneity.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def _run(alpha, seed, value, curve, val, *, rounds=None, skew=None, strategy="fedavg"):
    run = {
        "kind": "optimizer",
        "task": "digits",
        "strategy": strategy,
        "alpha": alpha,
        "seed": seed,
        "value": value,
        "rounds": rounds or len(curve),
        "test_curve": curve,
        "val_accuracy": val,
        "seconds": 2.5,
    }
    if skew:
        run["skew"] = skew
    return run


# digits' FedAvg grid is client lr 0.1 / 0.3 / 1.0
IID = [
    _run("iid", 3, 0.1, [0.40, 0.70, 0.80], 0.71),
    _run("iid", 3, 0.3, [0.50, 0.76, 0.84], 0.79),  # picked: final 0.84, target 0.798
    _run("iid", 3, 1.0, [0.30, 0.60, 0.90], 0.74),  # best test, worse validation
]


def _row(rows, alpha, skew=None, rounds=3):
    (row,) = [
        r
        for r in rows
        if str(r["alpha"]) == str(alpha) and r.get("skew") == skew and r["rounds"] == rounds
    ]
    return row


def test_the_pick_is_the_best_validation_value_and_the_first_on_a_tie(het):
    skewed = [
        _run(0.05, 3, 0.1, [0.20, 0.50, 0.81], 0.62),
        _run(0.05, 3, 0.3, [0.20, 0.60, 0.70], 0.62),  # ties with 0.1: the grid's first wins
        _run(0.05, 3, 1.0, [0.20, 0.60, 0.95], 0.55),
    ]
    rows = het.optimizer_rows(IID + skewed)
    iid = _row(rows, "iid")
    assert (iid["value"], iid["final_accuracy"], iid["val_accuracy"]) == (0.3, 0.84, 0.79)
    row = _row(rows, 0.05)
    assert row["value"] == 0.1 and row["final_accuracy"] == 0.81
    assert row["target_accuracy"] == pytest.approx(0.95 * 0.84)
    assert row["rounds_to_target"] == 3  # 0.81 >= 0.798 first at round 3
    assert row["seconds"] == pytest.approx(3 * 2.5)  # the whole grid's time


def test_an_incomplete_grid_gives_no_row(het):
    rows = het.optimizer_rows(IID + [_run(0.1, 3, 0.1, [0.2, 0.9, 0.9], 0.9)])
    assert [str(r["alpha"]) for r in rows] == ["iid"]


def test_a_cell_that_never_reaches_the_target_and_one_without_an_iid_run(het):
    never = [_run(0.3, 3, v, [0.3, 0.5, 0.79], 0.6 + v / 10) for v in (0.1, 0.3, 1.0)]
    other_seed = [_run(0.3, 4, v, [0.3, 0.5, 0.9], 0.6) for v in (0.1, 0.3, 1.0)]
    rows = het.optimizer_rows(IID + never + other_seed)
    reached = {(r["seed"], str(r["alpha"])): r for r in rows}
    assert reached[(3, "0.3")]["rounds_to_target"] is None  # 0.79 < 0.798
    assert reached[(3, "0.3")]["value"] == 1.0
    assert reached[(4, "0.3")]["target_accuracy"] is None  # seed 4 has no IID run
    assert reached[(4, "0.3")]["rounds_to_target"] is None


def test_skew_rows_count_against_the_label_grids_iid_run_of_the_same_length(het):
    quantity = [
        _run("iid", 3, v, [0.5, 0.8, 0.81], 0.7 + v / 10, skew="quantity") for v in (0.1, 0.3, 1.0)
    ]
    # a 5-round IID run whose target (0.95 * 0.60 = 0.57) the 3-round skew rows must not use
    longer = [_run("iid", 3, v, [0.1, 0.2, 0.3, 0.5, 0.60], 0.5) for v in (0.1, 0.3, 1.0)]
    rows = het.optimizer_rows(IID + quantity + longer)
    row = _row(rows, "iid", skew="quantity")
    assert row["target_accuracy"] == pytest.approx(0.95 * 0.84)
    assert row["rounds_to_target"] == 2  # 0.8 >= 0.798 at round 2
    assert _row(rows, "iid", rounds=5)["rounds_to_target"] == 5  # 0.60 >= 0.57 first at round 5


def _table_row(alpha, seed, acc, reached, rounds, target=0.8):
    return {
        "task": "digits",
        "strategy": "fedavg",
        "alpha": alpha,
        "seed": seed,
        "final_accuracy": acc,
        "rounds_to_target": reached,
        "target_accuracy": target,
        "rounds": rounds,
    }


def test_medians_never_mix_run_lengths_and_order_unreached_runs_last(het):
    rows = [
        _table_row(0.1, 0, 0.70, 7, 30),
        _table_row(0.1, 1, 0.60, None, 30),
        _table_row(0.1, 2, 0.90, 4, 30),
        _table_row(0.1, 0, 0.20, 9, 10),
        _table_row(0.1, 1, 0.30, 8, 10),
        _table_row(0.3, 0, 0.85, 5, 10),  # 10 rounds: 3 rows, 30 rounds: 3 rows
    ]
    assert het.optimizer_rounds(rows, "digits") == [30, 10]  # a tie goes to the longer
    long = het.medians(rows, "digits")
    assert long == {("fedavg", "0.1"): (0.70, 7, 3)}  # 4, 7, never -> 7
    short = het.medians(rows, "digits", rounds=10)
    assert short[("fedavg", "0.1")] == (pytest.approx(0.25), 8.5, 2)
    assert short[("fedavg", "0.3")] == (0.85, 5, 1)
    # an even count whose middle pair holds an unreached run has no median round
    rows.append(_table_row(0.1, 3, 0.65, None, 30))
    assert het.medians(rows, "digits")[("fedavg", "0.1")] == (pytest.approx(0.675), None, 4)
    # rows without an IID target count for the accuracy, not for the rounds
    rows.append(_table_row(0.3, 1, 0.95, None, 10, target=None))
    assert het.medians(rows, "digits", rounds=10)[("fedavg", "0.3")] == (
        pytest.approx(0.90),
        5,
        2,
    )


def test_the_personal_runs_score_each_client_on_its_own_held_out_split(het, tmp_path):
    """The benchmark's personal path end to end on the digits (1 round): the clients it scores
    are those holding out their own data, "none" scores the global model on them, and
    ``--global-strategy`` runs that strategy over the optimizer rows' client setup."""
    cfg = het.personal_config("digits", "none", 0.3, 5, 1, tmp_path)
    assert cfg["server"].get("strategy", "fedavg") == "fedavg"
    out = het.run_personal("digits", "none", cfg)
    assert out["mean_personal_accuracy"] == out["mean_global_accuracy"]
    assert 0.0 <= out["worst_personal_accuracy"] <= out["mean_personal_accuracy"] <= 1.0
    _, exp = het._experiment("digits", cfg)
    try:
        own = het._own_eval(exp)
        # every one of the 20 clients holds out 20% of a partition of dozens of images
        assert own == list(range(20))
        assert all(int(exp.fed.clients[c].eval_y.shape[0]) >= 1 for c in own)
    finally:
        exp.close()
    tuned = het.personal_config("digits", "ditto", 0.3, 5, 1, tmp_path, ("fedavgm", 0.3))
    assert tuned["server"]["strategy"] == "fedavgm" and tuned["server"]["server_lr"] == 0.3
    assert tuned["client"]["optimizer"] == "sgd" and tuned["client"]["lr"] == 0.3
    assert tuned["personalization"]["method"] == "ditto"
    assert tuned["data"]["client_eval_fraction"] == pytest.approx(0.2)
    local = het.run_personal("digits", "local", cfg)
    assert local["mean_global_accuracy"] is None and local["local_epochs"] == 2
