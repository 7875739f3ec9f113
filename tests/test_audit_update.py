"""The update-level canary audit: gradient canaries in one client's replayed DP-SGD update,
scored on what the server sees, bounded against the epsilon of that one release."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

import fedguard
from conftest import tiny_config
from fedguard.audit import one_run, update_canary
from fedguard.audit import runner as audit_runner
from fedguard.audit.target import AuditError

DELTA = 1e-5


def _local_dp_run(tmp_path, name, noise, batch_size=25, epochs=2, **extra):
    # 4 clients of 32 training examples, batch 25 (sampling rate 0.78), 2 local epochs; a
    # logistic regression on 32x32 images has 3,075 parameters, room for 1,000 canaries
    cfg = tiny_config(
        experiment={"rounds": 2, "seed": 5},
        data={"num_clients": 4, "synthetic_samples": 200, "synthetic_shape": [1, 32, 32]},
        client={"lr": 0.5, "batch_size": batch_size, "epochs": epochs},
        privacy={"mode": "local", "noise_multiplier": noise, "max_grad_norm": 0.8, "delta": DELTA},
        **extra,
    )
    out = tmp_path / name
    fedguard.run(cfg, out=out, progress=False)
    return out


def _audit(out, round_=2, seed=3):
    options = audit_runner.AuditOptions(
        update=update_canary.UpdateCanarySettings(round=round_, canaries=1000, seed=seed)
    )
    report = audit_runner.audit(out, ["update"], options=options)
    return report.rows[0], report.lines[0]


def _pld_epsilon(noise, steps, rate):
    """The release's epsilon straight from dp-accounting (the reference for the audit's)."""
    accountant = pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(DELTA))


def test_update_canaries_stay_below_the_release_epsilon_and_see_through_weak_noise(tmp_path):
    out = _local_dp_run(tmp_path, "weak", 1.0)
    row, line = _audit(out)
    assert row["attack"] == "update" and row["observed"] == "the update"
    assert row["scoring"] == "blind"  # Poisson sampling: the batches are secret
    assert (row["round"], row["client"], row["canaries"]) == (2, 0, 1000)
    assert row["dp_sgd_steps"] == 2 and row["dp_sgd_sampling_rate"] == pytest.approx(25 / 32)
    reference = _pld_epsilon(1.0, 2, 25 / 32)
    assert row["accounted_epsilon"] == pytest.approx(reference, rel=1e-3)  # 5.95
    assert row["run_epsilon"] > row["accounted_epsilon"]  # 12.3 over both rounds
    # the server's view of one update shows what the final model hides: 175 of 200 guesses
    # right, a bound of 1.43 (the final-model audit of such runs measured 0)
    assert 1.0 < row["epsilon_lower_bound"] <= row["accounted_epsilon"]
    assert not row["violation"]
    assert row["mean_score_included"] > row["mean_score_excluded"] + 0.01
    assert "update: epsilon lower bound 1.43" in line and "ERROR" not in line
    written = json.loads((out / "audit" / "audit.json").read_text())["rows"][0]
    assert written["epsilon_lower_bound"] == row["epsilon_lower_bound"]


def test_full_batch_dp_sgd_audits_like_a_gaussian_mechanism_simulated_directly(tmp_path):
    # Full-batch DP-GD (sampling rate 1), one step at noise multiplier 2: the informed scores
    # (the client's noiseless update subtracted) are a canary's push plus Gaussian noise of 2
    # pushes, so the bound must fall where one-run audits of that Gaussian mechanism, drawn
    # directly in NumPy with 1,000 canaries, fall (0.36-0.89 over 50 draws; 0.73 measured)
    out = _local_dp_run(tmp_path, "dpgd", 2.0, batch_size=1000, epochs=1)
    row, _ = _audit(out)
    assert row["scoring"] == "informed"
    assert (row["dp_sgd_steps"], row["dp_sgd_sampling_rate"]) == (1, 1.0)
    assert row["accounted_epsilon"] == pytest.approx(_pld_epsilon(2.0, 1, 1.0), rel=1e-3)  # 1.99
    simulated = []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = included + rng.normal(0.0, 2.0, 1000)
        simulated.append(one_run.audit(scores, included, DELTA).epsilon_lower_bound)
    assert min(simulated) <= row["epsilon_lower_bound"] <= max(simulated)
    assert row["epsilon_lower_bound"] <= row["accounted_epsilon"]
    assert row["mean_score_excluded"] == pytest.approx(0.0, abs=2e-3)  # the noise's mean


def test_update_canaries_catch_dp_sgd_without_its_noise(tmp_path, monkeypatch):
    # DP-SGD that drops its noise while reporting sigma 4: the release's epsilon is 1.10, and
    # the canaries stand out of the update (490 of 500 guesses right, a bound of 3.15)
    from fedguard.client import dp_sgd

    out = _local_dp_run(tmp_path, "noiseless", 4.0)  # the run itself is honest
    real = dp_sgd.noisy_mean
    monkeypatch.setattr(
        dp_sgd, "noisy_mean", lambda batch, std, size, generator: real(batch, 0.0, size, generator)
    )
    row, line = _audit(out)
    assert row["accounted_epsilon"] == pytest.approx(_pld_epsilon(4.0, 2, 25 / 32), rel=1e-3)
    assert row["correct_guesses"] >= 0.9 * row["guesses"]
    assert row["epsilon_lower_bound"] > 2.0 * row["accounted_epsilon"]
    assert row["violation"] and "ERROR: above this update's accounted epsilon" in line
    monkeypatch.undo()
    honest, _ = _audit(out)  # the same replay with the noise: below the release's epsilon
    assert honest["epsilon_lower_bound"] < 0.5 < honest["accounted_epsilon"]
    assert not honest["violation"]


def test_under_secure_aggregation_the_server_sees_the_sum(tmp_path):
    out = _local_dp_run(
        tmp_path,
        "secagg",
        1.0,
        secure_aggregation={"enabled": True, "clip_norm": 5.0},
    )
    row, _ = _audit(out)
    assert row["observed"] == "the sum of 4 updates"
    # the other clients' DP-SGD noise hides the canaries further
    assert row["epsilon_lower_bound"] <= row["accounted_epsilon"]
    assert not row["violation"]


def test_only_local_dp_runs_are_audited_update_by_update(tmp_path):
    cfg = tiny_config(
        experiment={"rounds": 1, "seed": 5},
        data={"num_clients": 4, "synthetic_samples": 120, "synthetic_shape": [1, 8, 8]},
    )
    out = tmp_path / "plain"
    fedguard.run(cfg, out=out, progress=False)
    with pytest.raises(AuditError, match="privacy.mode = 'off'"):
        audit_runner.audit(out, ["update"])
