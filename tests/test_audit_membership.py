"""Membership inference on a run's final model: the loss attack and offline LiRA see the
members of a deliberately overfit run, and nothing much under DP-SGD at a small epsilon."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedguard
from conftest import tiny_config
from fedguard.audit import membership
from fedguard.audit import runner as audit_runner


def _run(tmp_path, name: str, **sections) -> dict:
    """A logistic regression trained to memorise random labels (audit_plugins.random_labels:
    40 records per client, 144 features), audited with two LiRA reference models."""
    cfg = tiny_config(
        experiment={"rounds": 4, "seed": 1},
        data={"dataset": "audit_plugins:random_labels", "num_clients": 2, "partition": "iid"},
        client={"epochs": 10, "batch_size": 10, "lr": 0.5},
        server={"clients_per_round": 2},
        **sections,
    )
    out = tmp_path / name
    fedguard.run(cfg, out=out, progress=False)
    options = audit_runner.AuditOptions(reference_models=2)
    return audit_runner.audit(out, ["membership"], options=options).rows[0]


@pytest.mark.plots  # its pictures are drawn (conftest)
def test_overfit_run_members_are_visible(tmp_path):
    row = _run(tmp_path, "overfit")
    assert row["members"] == 80 and row["non_members"] == 80 and row["reference_models"] == 2
    assert row["loss"]["auc"] > 0.75  # 0.86 measured
    assert row["lira"]["auc"] > 0.65  # 0.81 measured (labels are noise: no per-record hardness)
    assert row["auc"] == row["lira"]["auc"] and row["scored_by"] == "lira"
    assert [c["members"] for c in row["loss"]["per_client"]] == [40, 40]
    assert all(c["auc"] > 0.7 for c in row["loss"]["per_client"])
    assert (tmp_path / "overfit" / "audit" / "membership_roc.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "overfit" / "audit" / "audit.json").read_text())
    assert saved["rows"][0]["auc"] == row["auc"]


def test_dp_sgd_at_small_epsilon_hides_the_members(tmp_path):
    row = _run(
        tmp_path,
        "dp",
        privacy={"mode": "local", "noise_multiplier": 8.0, "max_grad_norm": 0.5},
    )
    assert row["protection"] == "local" and row["accounted_epsilon"] < 2.5  # 1.71 measured
    assert abs(row["loss"]["auc"] - 0.5) < 0.12  # 0.535 measured
    assert abs(row["lira"]["auc"] - 0.5) < 0.12  # 0.498 measured


def test_roc_metrics_of_separated_and_of_reversed_scores():
    labels = np.array([1, 1, 1, 0, 0, 0])
    perfect = membership.roc_metrics(labels, np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.0]))
    assert perfect == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0_1pct_fpr": 1.0}
    reversed_ = membership.roc_metrics(labels, np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]))
    assert reversed_["auc"] == 0.0 and reversed_["tpr_at_1pct_fpr"] == 0.0


def test_lira_scores_are_z_scores_against_the_reference_models():
    references = np.array([[0.0, 1.0], [2.0, 3.0]])  # per-record means 1 and 2, pooled std sqrt(2)
    scores = membership.lira_scores(np.array([1.0 + np.sqrt(2.0), 2.0]), references)
    assert scores == pytest.approx([1.0, 0.0])
