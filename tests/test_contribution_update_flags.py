"""The update test of the free-rider flags (issue 18): a round's update is suspect when its norm
is far below the round's median or, when asked, when it points away from the others' mean.

Every expected value is recomputed here in NumPy float64 from its definition (the median of the
row norms; the others' weighted sum by an explicit loop over the other rows), not read back from
the code under test. Run tests reuse the digits federation of ``test_contribution_runs`` (nine
IID clients, free riders 7 and 8 sending zero, client 0 with every label shuffled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_contribution_runs import BAD, FREE_RIDERS, NOISY, config, read, run

from fedguard.algorithms.contribution import free_riders
from fedguard.algorithms.contribution import utility as cu
from fedguard.experiment import config as config_mod

WEIGHTS = [420.0, 150.0, 300.0, 80.0, 210.0, 264.0, 45.0, 390.0]  # claimed example counts
D = 3000


def designed_round() -> np.ndarray:
    """Eight updates of one round, float64 ``[8, D]``, each built to be one kind of client.

    0, 5 and 7: honest, along a shared direction ``g`` with their own noise; 1: a free rider
    (zero); 2: near zero (a free rider that adds a trace, 2e-5 of ``g`` and noise); 3: an honest
    client holding one class, pointing *against* the others (as the medical example's one-class
    hospitals do); 4: pure noise of an honest norm (a disguised free rider); 6: a label flipper,
    pointing against the others harder than 3.
    """
    rng = np.random.default_rng(11)
    g = rng.normal(size=D)
    noise = rng.normal(size=(8, D))
    return np.stack(
        [
            0.004 * g + 0.0015 * noise[0],
            np.zeros(D),
            2e-5 * (g + noise[2]),
            -0.002 * g + 0.004 * noise[3],
            0.005 * noise[4],
            0.0035 * g + 0.002 * noise[5],
            -0.006 * g + 0.001 * noise[6],
            0.003 * g + 0.0015 * noise[7],
        ]
    )


def reference(u: np.ndarray, w: list[float]) -> tuple[list[float], list[float | None]]:
    """Norm ratios to the median norm and cosines to the others' weighted sum, by definition."""
    norms = [float(np.linalg.norm(row)) for row in u]
    median = float(np.median(norms))
    ratios = [n / median for n in norms]
    cosines: list[float | None] = []
    for k, row in enumerate(u):
        others = np.zeros(u.shape[1])
        for j in range(len(u)):
            if j != k:
                others += w[j] * u[j]
        if norms[k] == 0:
            cosines.append(0.0)
        elif np.linalg.norm(others) == 0:
            cosines.append(None)
        else:
            cosines.append(float(row @ others / (norms[k] * np.linalg.norm(others))))
    return ratios, cosines


def known(cosine: float | None) -> float:
    """A cosine the reference could compute (the designed round has no undefined one)."""
    assert cosine is not None
    return cosine


def evidence(u: np.ndarray, w: list[float], **test: Any) -> free_riders.UpdateEvidence:
    return free_riders.update_evidence(
        torch.from_numpy(u).to(torch.float32),
        torch.tensor(w, dtype=torch.float64),
        free_riders.UpdateTest(**test),
    )


def suspects(e: free_riders.UpdateEvidence) -> set[int]:
    return {k for k, bad in enumerate(e.suspect) if bad}


def test_the_norm_test_flags_exactly_the_zero_and_near_zero_updates() -> None:
    u = designed_round().astype(np.float32).astype(np.float64)  # what the float32 rows hold
    ratios, cosines = reference(u, WEIGHTS)
    e = evidence(u, WEIGHTS)
    assert e.norm_ratios == pytest.approx(ratios, rel=1e-12)
    assert e.median_norm == pytest.approx(float(np.median(np.linalg.norm(u, axis=1))), rel=1e-12)
    assert e.cosines == pytest.approx(cosines, rel=1e-9, abs=1e-12)
    # the designed kinds landed where they were meant to (else the verdicts below test nothing)
    assert ratios[1] == 0.0 and ratios[2] < 0.01
    assert min(ratios[k] for k in (0, 3, 4, 5, 6, 7)) > 0.5  # measured 0.80..1.47
    assert min(known(cosines[k]) for k in (0, 5, 7)) > 0.7  # measured 0.74..0.77
    assert cosines[3] is not None and cosines[3] < -0.4  # the honest one-class client: -0.42
    assert cosines[4] is not None and abs(cosines[4]) < 4 / math.sqrt(D)  # noise: ~N(0, 1/D)
    assert cosines[6] is not None and cosines[6] < -0.9  # the flipper: -0.92
    # the default test (norm below 1% of the median) flags the two and not the one-class client
    assert suspects(e) == {1, 2}
    assert suspects(evidence(u, WEIGHTS, min_norm_ratio=0.0)) == {1}  # zero is always suspect


def test_the_cosine_test_also_flags_noise_and_flippers_and_the_honest_one_class_client() -> None:
    u = designed_round().astype(np.float32).astype(np.float64)
    _, cosines = reference(u, WEIGHTS)
    # a bound just above pure noise flags the noise, the flipper, and the honest one-class
    # client too: on non-IID data the cosine cannot tell them apart, so it is off by default
    assert suspects(evidence(u, WEIGHTS, min_cosine=0.05)) == {1, 2, 3, 4, 6}
    # a bound between the flipper and the one-class client separates these two designed ones
    between = (known(cosines[3]) + known(cosines[6])) / 2
    assert suspects(evidence(u, WEIGHTS, min_cosine=between)) == {1, 2, 6}


def test_blocks_of_columns_give_the_same_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    u = designed_round()
    whole = evidence(u, WEIGHTS, min_cosine=0.05)
    monkeypatch.setattr(free_riders, "CHUNK", 7)  # 3000 columns in 429 blocks, the last of 4
    blocks = evidence(u, WEIGHTS, min_cosine=0.05)
    assert blocks.suspect == whole.suspect
    assert blocks.norm_ratios == pytest.approx(whole.norm_ratios, rel=1e-12)
    assert blocks.cosines == pytest.approx(whole.cosines, rel=1e-9, abs=1e-12)


def test_rounds_where_there_is_nothing_to_compare_with() -> None:
    honest = np.array([[0.75, -1.5, 0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = evidence(honest, [30.0, 12.0, 7.0], min_cosine=0.5)
    # the others of the honest client are all zero: no cosine, and not suspect for it; the two
    # zero updates compare with the honest one (cosine 0) and are suspect; the median norm is 0
    assert e.median_norm == 0.0
    assert e.norm_ratios == (None, 0.0, 0.0)
    assert e.cosines == (None, 0.0, 0.0)
    assert e.suspect == (False, True, True)
    alone = evidence(honest[:1], [30.0], min_cosine=0.5)
    assert alone.norm_ratios == (1.0,) and alone.cosines == (None,) and alone.suspect == (False,)
    assert evidence(np.zeros((1, 3)), [30.0]).suspect == (True,)
    # weights only enter the others' mean: with the other's weight 0 it has no mean
    pair = np.array([[0.5, 0.25], [-0.5, 0.125]])
    weightless = evidence(pair, [3.0, 0.0], min_cosine=0.5)
    assert weightless.cosines[0] is None
    assert weightless.cosines[1] == pytest.approx(
        (-0.25 + 0.03125) / (math.sqrt(0.3125) * math.sqrt(0.265625)), rel=1e-9
    )


def test_local_dp_what_the_test_can_and_cannot_see() -> None:
    """Honest updates dominated by their DP noise (norm of the noise 6x the signal's): a free
    rider that sends zero is still flagged; one that sends the noise alone has an honest norm
    and a cosine as small as the honest clients' (both of order 1/sqrt(D))."""
    rng = np.random.default_rng(3)
    d = 20_000
    g = rng.normal(size=d)
    sigma = 0.006
    honest = [0.001 * g + sigma * rng.normal(size=d) for _ in range(5)]
    u = np.stack([*honest, np.zeros(d), sigma * rng.normal(size=d)])
    w = [50.0, 75.0, 60.0, 90.0, 40.0, 70.0, 55.0]
    ratios, cosines = reference(u.astype(np.float32).astype(np.float64), w)
    e = evidence(u, w)
    assert suspects(e) == {5}
    assert 0.95 < ratios[6] < 1.0  # noise alone: just under the honest noise-plus-signal norm
    honest_cos = [c for c in cosines[:5] if c is not None]
    noise_cos = cosines[6]
    assert noise_cos is not None and abs(noise_cos) < 4 / math.sqrt(d)
    assert max(honest_cos) < 0.2  # the honest clients' own noise hides their agreement


def test_update_streaks_flag_after_patience_suspect_rounds_and_reset() -> None:
    state = free_riders.empty()
    seen = []
    rounds = [
        (1, {3: True, 5: False}),
        (2, {3: True}),  # client 5 absent: its streak neither grows nor breaks
        (4, {3: False, 5: True}),
        (6, {3: True, 5: True}),
        (7, {3: True, 5: True}),
    ]
    for round_, suspect in rounds:
        state = free_riders.record(state, round_, suspect)
        seen.append(sorted(free_riders.reached(3, state)))
    assert seen == [[], [], [], [], [5]]
    assert dict(state.streaks) == {3: 2, 5: 3}
    assert free_riders.from_json(json.loads(json.dumps(free_riders.to_json(state)))) == state
    with pytest.raises(cu.ContributionError, match="increasing order"):
        free_riders.record(state, 7, {3: True})


def test_the_update_test_refuses_what_it_cannot_measure() -> None:
    u = torch.zeros(2, 4)
    with pytest.raises(cu.ContributionError, match="non-empty"):
        free_riders.update_evidence(torch.zeros(4), torch.ones(1), free_riders.UpdateTest())
    with pytest.raises(cu.ContributionError, match="Expected 2 weights"):
        free_riders.update_evidence(u, torch.ones(3), free_riders.UpdateTest())
    with pytest.raises(cu.ContributionError, match="NaN"):
        free_riders.update_evidence(
            torch.tensor([[0.0, math.nan]]), torch.ones(1), free_riders.UpdateTest()
        )
    with pytest.raises(cu.ContributionError, match="finite and >= 0"):
        free_riders.update_evidence(u, torch.tensor([3.0, -1.0]), free_riders.UpdateTest())
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(cu.ContributionError, match="min_norm_ratio"):
            free_riders.UpdateTest(min_norm_ratio=bad)
    for bad in (1.5, -2.0, math.inf):
        with pytest.raises(cu.ContributionError, match="min_cosine"):
            free_riders.UpdateTest(min_cosine=bad)


# ---- in runs: digits, nine IID clients, free riders 7 and 8, client 0's labels shuffled ------


def test_the_default_rule_flags_the_free_riders_from_their_updates(tmp_path: Path) -> None:
    summary = run(tmp_path, "upd", config("cosine", rounds=2, flag_patience=2))
    contribution = summary["contribution"]
    assert contribution["flag_rule"] == "update"
    assert contribution["flagged_by"] == {"update": list(FREE_RIDERS)}
    assert contribution["flagged"] == list(FREE_RIDERS) == [7, 8]
    assert contribution["evaluations"] == 0
    scores = read(tmp_path / "upd", "contributions.json")
    for record in scores["rounds"]:
        ratios = record["update_norm_ratio"]
        assert [ratios[str(c)] for c in FREE_RIDERS] == [0.0, 0.0]
        assert record["update_suspect"] == [7, 8]
        # measured: honest 0.945..1.125 of the median; the noisy client's shuffled labels give
        # a shorter update (0.518 and 0.548), far above the bound
        assert min(v for c, v in ratios.items() if int(c) not in BAD) > 0.9
        assert 0.4 < ratios[str(NOISY)] < 0.6
        # on IID data the noisy client disagrees with the others (measured cosines 0.225 and
        # 0.084 in rounds 1-2) where every honest client agrees (0.761..0.901)
        cosines = record["update_cosine"]
        assert min(v for c, v in cosines.items() if int(c) not in BAD) > 0.7
        assert cosines[str(NOISY)] < 0.3
    floor_share = 0.1 * 100.0 / 9
    rewards = contribution["rewards"]
    assert [rewards[str(c)] for c in FREE_RIDERS] == pytest.approx([floor_share] * 2, abs=1e-12)
    assert min(v for c, v in rewards.items() if int(c) not in FREE_RIDERS) > floor_share


def test_either_rule_keeps_both_flags_and_exclusion_restores_the_honest_step(
    tmp_path: Path,
) -> None:
    summary = run(
        tmp_path, "either", config("leave_one_out", rounds=2, flag_rule="either", flag_patience=2)
    )
    assert summary["contribution"]["flagged_by"] == {"score": sorted(BAD), "update": [7, 8]}
    assert summary["contribution"]["flagged"] == sorted(BAD)
    # on IID data a cosine bound of 0.5 also flags the noisy client, from round 1 (patience 1)
    flags = {"flag_patience": 1, "flag_min_cosine": 0.5, "exclude_flagged": True}
    excluded = run(tmp_path, "ex", config("cosine", rounds=2, **flags))
    rows = [json.loads(x) for x in (tmp_path / "ex" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_excluded"] for r in rows] == [0, 3]
    assert [r["clients_completed"] for r in rows] == [9, 6]
    assert excluded["contribution"]["excluded"] == {str(c): [2] for c in sorted(BAD)}
    assert excluded["contribution"]["flagged_by"] == {"update": sorted(BAD)}


def test_a_free_rider_sending_zero_is_flagged_under_local_dp(tmp_path: Path) -> None:
    cfg = config("cosine", rounds=2, flag_patience=2)
    cfg["privacy"] = {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    summary = run(tmp_path, "ldp", cfg)
    assert summary["contribution"]["flagged"] == [7, 8]
    for record in read(tmp_path / "ldp", "contributions.json")["rounds"]:
        ratios = record["update_norm_ratio"]
        assert [ratios[str(c)] for c in FREE_RIDERS] == [0.0, 0.0]
        # the DP noise sets every trained update's norm (measured 0.945..1.073 of the median,
        # the noisy client's included) and drowns the agreement the cosine test would read
        # (measured -0.001..0.127, the noisy client's 0.005..0.06 among them)
        assert min(v for c, v in ratios.items() if int(c) not in FREE_RIDERS) > 0.9
        cosines = record["update_cosine"]
        assert max(v for c, v in cosines.items() if int(c) not in FREE_RIDERS) < 0.2


def test_resume_continues_the_update_streaks(tmp_path: Path) -> None:
    cfg = config("cosine", rounds=2, flag_patience=2)
    run(tmp_path, "cut", config("cosine", rounds=1, flag_patience=2))
    resumed = run(tmp_path, "cut", cfg, resume=True)
    # flagged after round 2 (patience 2): only possible if round 1's streak was restored
    assert resumed["contribution"]["flagged"] == [7, 8]


def test_flag_keys_are_checked_before_round_1() -> None:
    cases = [
        ({"flag_threshold": -0.01}, 'flag_rule = "update" flags on the updates alone'),
        ({"flag_rule": "score", "flag_min_cosine": 0.1}, "contribution.flag_min_cosine bounds"),
        ({"flag_rule": "score", "flag_min_norm_ratio": 0.05}, "flag_min_norm_ratio bounds"),
        ({"flag_rule": "norm"}, "contribution.flag_rule"),
        ({"flag_min_norm_ratio": 1.0}, "contribution.flag_min_norm_ratio"),
        ({"flag_min_cosine": 1.5}, "contribution.flag_min_cosine"),
    ]
    for keys, message in cases:
        with pytest.raises(config_mod.ConfigError, match=message):
            config_mod.validate(config("cosine", **keys))
    with pytest.raises(config_mod.ConfigError, match="contribution.flag_rule is set"):
        config_mod.validate(config("none", flag_rule="either"))
    ok = config_mod.validate(config("cosine", flag_rule="either", flag_threshold=-0.01))
    assert ok.contribution.flag_rule == "either" and ok.contribution.flag_min_norm_ratio == 0.01
    secure = config("cosine", flag_rule="update")
    secure.pop("attack")
    secure["secure_aggregation"] = {"enabled": True, "clip_norm": 1.0}
    with pytest.raises(config_mod.ConfigError, match="secure aggregation hides"):
        config_mod.validate(secure)
