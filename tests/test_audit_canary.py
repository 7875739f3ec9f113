"""The one-run canary audit (Steinke, Nasr and Jagielski 2023): the bound's math on a Gaussian
mechanism simulated directly, and canaries inserted by a run and scored by `fedguard audit`."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

import fedguard
from conftest import tiny_config
from fedguard import cli
from fedguard.audit import canary, one_run
from fedguard.audit import runner as audit_runner

DELTA = 1e-5


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism (sensitivity 1, std ``sigma``), by PLD."""
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.get_epsilon(delta))


def simulate(m: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """M canaries, each included with probability 1/2; the auditor sees inclusion + N(0, s^2)."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return included + rng.normal(0.0, sigma, m) if sigma > 0 else included * 1.0, included


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_bound_is_below_the_true_epsilon_and_within_a_factor_of_three(seed):
    # sigma = 2: epsilon 1.99 at delta 1e-5; 10,000 canaries measure 0.97, 1.18 and 0.94
    eps = gaussian_epsilon(2.0, DELTA)
    scores, included = simulate(10_000, 2.0, seed)
    bound = one_run.audit(scores, included, DELTA).epsilon_lower_bound
    assert bound <= eps
    assert bound >= eps / 3


def test_gaussian_bound_grows_with_the_canaries():
    eps = gaussian_epsilon(1.0, DELTA)  # 4.38
    few = one_run.audit(*simulate(1_000, 1.0, 0), DELTA).epsilon_lower_bound
    many = one_run.audit(*simulate(30_000, 1.0, 0), DELTA).epsilon_lower_bound
    assert few < many <= eps
    assert many >= eps / 3


def test_without_noise_the_bound_exceeds_four():
    scores, included = simulate(1_000, 0.0, 0)
    result = one_run.audit(scores, included, DELTA)
    assert result.correct == result.guesses
    assert result.epsilon_lower_bound > 4.0  # 4.57 measured: 500 of 500 guesses right


def test_chance_guesses_give_no_bound():
    rng = np.random.default_rng(5)
    included = rng.random(2_000) < 0.5
    assert one_run.audit(rng.normal(size=2_000), included, DELTA).epsilon_lower_bound == 0.0


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_epsilon():
    from scipy import stats

    q = 1 / (1 + np.exp(-1.0))
    assert one_run.p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
    values = [one_run.p_value(100, 50, 40, e, 1e-4) for e in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < values[-1]
    # the delta term is added: 2 m delta times the largest average of the pmf below v
    assert one_run.p_value(100, 50, 40, 1.0, 1e-4) > one_run.p_value(100, 50, 40, 1.0, 0.0)


def test_bound_is_where_the_p_value_crosses_the_failure_probability():
    eps = one_run.epsilon_lower_bound(1_000, 200, 180, DELTA, 0.05)
    assert one_run.p_value(1_000, 200, 180, eps, DELTA) < 0.05
    assert one_run.p_value(1_000, 200, 180, eps + 1e-3, DELTA) >= 0.05


def test_correct_guesses_counts_both_kinds():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    # top 2 guessed in: 0.9 (right), 0.8 (wrong); bottom 2 guessed out: 0.1, 0.2 (both right)
    assert one_run.correct_guesses(scores, included, 2, 2) == (4, 3)


def test_canary_plan_is_seeded_and_halves_the_canaries():
    a = canary.plan(canary.RECORD, 2_000, 7, [0, 1, 2], first_new_id=3)
    assert a == canary.plan(canary.RECORD, 2_000, 7, [0, 1, 2], first_new_id=3)
    assert 900 < sum(a.included) < 1100
    assert set(a.clients) == {0, 1, 2} and len(a.clients) == sum(a.included)
    u = canary.plan(canary.USER, 10, 7, [0, 1, 2], first_new_id=3)
    assert u.clients == tuple(range(3, 3 + sum(u.included)))


def _canary_run(tmp_path, **sections):
    cfg = tiny_config(
        experiment={"rounds": 3, "seed": 1},
        data={"num_clients": 2, "synthetic_samples": 200, "synthetic_shape": [1, 8, 8]},
        client={"epochs": 3, "batch_size": 8, "lr": 0.2},
        server={"clients_per_round": 2},
        audit={"canaries": 60},
        **sections,
    )
    out = tmp_path / "run"
    fedguard.run(cfg, out=out, progress=False)
    return out


def test_record_canaries_in_a_run_without_dp_give_a_positive_bound(tmp_path):
    out = _canary_run(tmp_path)
    recorded = json.loads((out / canary.FILE).read_text())
    assert recorded["kind"] == "record" and recorded["count"] == 60
    report = audit_runner.audit(out, ["canary"])
    row = report.rows[0]
    assert row["canary_kind"] == "record" and row["accounted_epsilon"] is None
    assert row["mean_score_included"] > row["mean_score_excluded"]
    assert row["epsilon_lower_bound"] > 0.5
    assert not report.violations
    assert json.loads((out / "audit" / "audit.json").read_text())["rows"][0] == row


def test_a_bound_above_the_accounted_epsilon_fails_naming_the_run(tmp_path, capsys):
    out = _canary_run(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    summary["epsilon"] = 0.01  # an accounting that claims far more privacy than the run has
    (out / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["audit", str(out), "--attack", "canary"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert str(out) in err and "exceeds the accounted epsilon" in err


def test_local_dp_run_bound_stays_below_the_accounted_epsilon(tmp_path):
    out = _canary_run(
        tmp_path, privacy={"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    )
    row = audit_runner.audit(out, ["canary"]).rows[0]
    assert row["protection"] == "local"
    assert row["epsilon_lower_bound"] <= row["accounted_epsilon"]
    assert not row["violation"]


def test_user_level_canary_clients_move_the_model_towards_their_direction(tmp_path):
    cfg = tiny_config(
        experiment={"rounds": 6, "seed": 2},
        data={"num_clients": 10, "synthetic_samples": 300, "synthetic_shape": [1, 8, 8]},
        server={"clients_per_round": 10},
        privacy={"mode": "central", "noise_multiplier": 0.05, "clip_norm": 1.0, "delta": 1e-3},
        audit={"canaries": 40},
    )
    out = tmp_path / "central"
    fedguard.run(cfg, out=out, progress=False)
    row = audit_runner.audit(out, ["canary"]).rows[0]
    assert row["canary_kind"] == "user"
    assert row["mean_score_included"] > row["mean_score_excluded"] + 0.05
    assert row["epsilon_lower_bound"] <= row["accounted_epsilon"]


def test_canaries_need_the_in_process_engine():
    from fedguard.experiment import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="audit.canaries"):
        config_mod.validate(tiny_config(audit={"canaries": 5}, runtime={"kind": "cohort"}))


def test_user_level_canaries_without_dp_give_a_bound_above_three(tmp_path):
    # Nothing protects a client in a run without DP: 300 canary clients (154 included, each
    # holding the median client's example count) and 10 real ones, all in every round, on a
    # model of 3,075 parameters; the included canaries' directions stand out of the final
    # change (cosine about 0.05 against about 0.003), so every guess is right: 150 of 150
    # give a bound of 3.41 at 95% confidence.
    seed = 3
    n = 10 + canary.included_count(300, seed)
    cfg = tiny_config(
        experiment={"rounds": 3, "seed": seed},
        data={"num_clients": 10, "synthetic_samples": 300, "synthetic_shape": [1, 32, 32]},
        server={"clients_per_round": n},
        privacy={"clip_norm": 0.7},
        audit={"canaries": 300, "canary_level": "user"},
    )
    out = tmp_path / "plain"
    fedguard.run(cfg, out=out, progress=False)
    row = audit_runner.audit(out, ["canary"]).rows[0]
    assert row["canary_kind"] == "user" and row["accounted_epsilon"] is None
    assert row["correct_guesses"] == row["guesses"] >= 150
    assert row["epsilon_lower_bound"] > 3.0
    assert not row["violation"]


def test_canary_level_is_checked():
    from fedguard.experiment import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="skip DP-SGD's per-example clipping"):
        config_mod.validate(
            tiny_config(
                privacy={"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
                audit={"canaries": 5, "canary_level": "user"},
            )
        )
    with pytest.raises(config_mod.ConfigError, match="canary_level"):
        config_mod.validate(tiny_config(audit={"canaries": 5, "canary_level": "client"}))
    assert canary.level("central") == canary.USER
    assert canary.level("distributed") == canary.USER
    assert canary.level("off") == canary.RECORD
    assert canary.level("local") == canary.RECORD
    assert canary.level("central", canary.RECORD) == canary.RECORD
    assert canary.level("off", canary.USER) == canary.USER


def test_user_level_canary_clients_take_part_in_verified_secure_aggregation(tmp_path):
    # Canary clients need identities like the real ones: without, a verified round drops them
    # at the signed keys and (40 canary clients of 46) aborts.
    seed = 4
    n = 6 + canary.included_count(40, seed)
    cfg = tiny_config(
        experiment={"rounds": 2, "seed": seed},
        data={"num_clients": 6, "synthetic_samples": 120, "synthetic_shape": [1, 16, 16]},
        server={"clients_per_round": n},
        privacy={"clip_norm": 0.8},
        secure_aggregation={"enabled": True, "clip_norm": 5.0},
        audit={"canaries": 40, "canary_level": "user"},
    )
    out = tmp_path / "secagg"
    fedguard.run(cfg, out=out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_completed"] for r in rows] == [n, n]
    row = audit_runner.audit(out, ["canary"]).rows[0]
    assert row["canary_kind"] == "user"
    assert row["mean_score_included"] > row["mean_score_excluded"] + 0.05


def _gradient_canary_run(tmp_path, name):
    # DP-SGD at sigma 4 with a high sampling rate (batch 25 of about 50 examples, 4 steps a
    # round), so that almost every included canary is sampled; 1,000 canaries among 3,075
    # parameters, each a record whose clipped gradient is 0.8 e_c.
    cfg = tiny_config(
        experiment={"rounds": 2, "seed": 5},
        data={"num_clients": 4, "synthetic_samples": 200, "synthetic_shape": [1, 32, 32]},
        client={"lr": 0.5, "batch_size": 25, "epochs": 2},
        privacy={"mode": "local", "noise_multiplier": 4.0, "max_grad_norm": 0.8, "delta": 1e-5},
        audit={"canaries": 1000, "canary_level": "gradient"},
    )
    out = tmp_path / name
    fedguard.run(cfg, out=out, progress=False)
    return audit_runner.audit(out, ["canary"]).rows[0]


def test_gradient_canaries_bound_stays_below_dp_sgd_accounted_epsilon(tmp_path):
    row = _gradient_canary_run(tmp_path, "honest")
    assert row["canary_kind"] == "gradient"
    assert 1.5 < row["accounted_epsilon"] < 2.5  # 1.90
    assert row["epsilon_lower_bound"] <= row["accounted_epsilon"]  # 0.06 measured
    assert not row["violation"]


def test_gradient_canaries_catch_dp_sgd_without_its_noise(tmp_path, monkeypatch):
    # A DP-SGD that forgets its noise while reporting (and accounting) sigma 4: the white-box
    # canaries stand out of the final model (483 of 500 guesses right) and the audit's bound,
    # 2.77, exceeds the accounted 1.90: the audit calls the run broken.
    from fedguard.client import dp_sgd

    real = dp_sgd.noisy_mean
    monkeypatch.setattr(
        dp_sgd, "noisy_mean", lambda batch, std, size, generator: real(batch, 0.0, size, generator)
    )
    row = _gradient_canary_run(tmp_path, "noiseless")
    assert row["correct_guesses"] >= 0.9 * row["guesses"]
    assert row["epsilon_lower_bound"] > row["accounted_epsilon"]
    assert row["violation"]


def test_gradient_canary_coordinates_are_distinct_trainable_positions():
    from fedguard.models import registry

    model = registry.build(
        "logistic_regression", framework="torch", input_shape=(1, 4, 4), num_classes=3, seed=0
    )  # weight [3, 16], bias [3]: 51 trainable values
    picked = canary.gradient_coordinates(7, 51, model)
    assert sorted(picked.tolist()) == list(range(51))
    assert picked.tolist() == canary.gradient_coordinates(7, 51, model).tolist()  # seeded
    assert picked.tolist() != canary.gradient_coordinates(8, 51, model).tolist()
    with pytest.raises(ValueError, match="trainable parameters"):
        canary.gradient_coordinates(7, 52, model)
