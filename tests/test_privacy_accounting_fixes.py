"""Privacy accounting checked against computations made here from first principles.

The reported epsilon must never be below the true one:

* central DP's multiplier is the noise std over the L2 sensitivity of the clipped sum under the
  accountant's neighbouring relation (``C`` add-or-remove-one, ``2C`` replace-one);
* a resumed run composes every round at the noise multiplier it ran at, and refuses a resume
  that cannot stay within ``target_epsilon``;
* adaptive clipping's count is centred (sensitivity 1/2 under add-or-remove-one) and uses the
  client's own bit;
* DP-SGD refuses augmented copies of records.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from scipy.special import log_ndtr

import fedguard
from conftest import tiny_config
from fedguard.experiment import checkpoint
from fedguard.experiment import config as config_mod
from fedguard.experiment.config import ConfigError
from fedguard.protocol import fedopt, messages
from fedguard.protocol.strategy import CentralDP, StrategyKind

DELTA = 1e-3
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _rows(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def analytic_gaussian_epsilon(std: float, sensitivity: float, delta: float) -> float:
    """Epsilon of the Gaussian mechanism at ``delta``, exactly (Balle & Wang 2018, theorem 8):
    ``delta(eps) = Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D)``, solved for eps."""

    def delta_of(eps: float) -> float:
        a = sensitivity / (2 * std)
        b = eps * std / sensitivity
        return math.exp(log_ndtr(a - b)) - math.exp(eps + log_ndtr(-a - b))

    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def _swor_epsilon(parts: list[tuple[float, float, int]], n: int, m: int) -> float:
    """RDP epsilon of fixed-size sampled rounds, built here from (noise std, L2 sensitivity,
    rounds) per part."""
    acc = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                n, m, dp_accounting.GaussianDpEvent(std / sensitivity)
            ),
            rounds,
        )
        for std, sensitivity, rounds in parts
    ]
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(DELTA)


# ---------------------------------------------------------------- item 1: the sensitivity


def test_fixed_size_full_participation_is_at_least_the_analytic_gaussian(tmp_path) -> None:
    z, clip, rounds = 1.3, 0.7, 3
    cfg = tiny_config(
        experiment={"rounds": rounds},
        server={"clients_per_round": 6},  # all 6 clients, every round: no sampling
        privacy={"mode": "central", "noise_multiplier": z, "clip_norm": clip, "delta": DELTA},
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    # replace-one: one client's clipped update swapped for another's moves the sum by up to 2C;
    # three Gaussian rounds of std s compose to one Gaussian of std s / sqrt(3)
    std, sensitivity = z * clip, 2 * clip
    exact = analytic_gaussian_epsilon(std / math.sqrt(rounds), sensitivity, DELTA)
    assert exact <= summary["epsilon"] <= 1.3 * exact  # RDP is an upper bound, close here
    p = summary["privacy"]
    assert p["noise_stddev"] == pytest.approx(std)
    assert p["l2_sensitivity"] == pytest.approx(sensitivity)
    assert p["accounted_noise_multiplier"] == pytest.approx(z / 2)


def test_poisson_full_participation_matches_the_analytic_gaussian(tmp_path) -> None:
    z, clip, rounds = 0.9, 0.3, 4
    cfg = tiny_config(
        experiment={"rounds": rounds},
        server={"sampling": "poisson", "clients_per_round": 6},  # rate 1
        privacy={
            "mode": "central",
            "noise_multiplier": z,
            "clip_norm": clip,
            "delta": DELTA,
            "accountant": "pld",
        },
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    exact = analytic_gaussian_epsilon(z * clip / math.sqrt(rounds), clip, DELTA)
    assert exact <= summary["epsilon"] <= exact * 1.01 + 1e-3  # PLD is nearly tight
    assert summary["privacy"]["l2_sensitivity"] == pytest.approx(clip)


def test_fixed_size_sampled_epsilon_from_std_and_sensitivity(tmp_path) -> None:
    # the review's case: 20 clients, 5 a round, z = 1, 3 rounds (3.72 reported, 11.69 true)
    z, clip = 1.0, 0.4
    cfg = tiny_config(
        data={"num_clients": 20},
        server={"clients_per_round": 5},
        privacy={"mode": "central", "noise_multiplier": z, "clip_norm": clip, "delta": DELTA},
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    expected = [_swor_epsilon([(z * clip, 2 * clip, r)], 20, 5) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in _rows(tmp_path / "r")] == pytest.approx(expected)
    assert summary["epsilon"] == pytest.approx(expected[-1]) == pytest.approx(11.69, abs=0.01)


def test_target_epsilon_calibrates_for_the_replace_one_sensitivity(tmp_path) -> None:
    clip = 0.25
    cfg = tiny_config(
        privacy={"mode": "central", "target_epsilon": 3.0, "clip_norm": clip, "delta": DELTA}
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    z = summary["privacy"]["noise_multiplier"]
    true = _swor_epsilon([(z * clip, 2 * clip, 3)], 6, 4)
    assert true == pytest.approx(summary["epsilon"]) and 2.99 <= true <= 3.0


# ---------------------------------------------------------------- item 2: resume


def _cut_back_to(folder, round_: int) -> None:
    """Leave only the checkpoints up to ``round_``, as if the run had stopped there."""
    for path in (folder / "checkpoints").glob("round_*"):
        if int(path.name.removeprefix("round_")) > round_:
            for f in path.iterdir():
                f.unlink()
            path.rmdir()


def test_resume_with_more_rounds_composes_the_rounds_that_ran(tmp_path) -> None:
    clip, target = 0.5, 2.0
    privacy = {"mode": "central", "target_epsilon": target, "clip_norm": clip, "delta": DELTA}
    six = tiny_config(experiment={"rounds": 6}, privacy=privacy, checkpoint={"keep": 6})
    first = fedguard.run(six, out=tmp_path / "r", progress=False)
    z6 = first["privacy"]["noise_multiplier"]
    _cut_back_to(tmp_path / "r", 3)  # stopped after round 3 of 6; resumed with 9 rounds
    nine = tiny_config(experiment={"rounds": 9}, privacy=privacy, checkpoint={"keep": 6})
    summary = fedguard.run(nine, out=tmp_path / "r", resume=True, progress=False)
    z_new = summary["privacy"]["noise_multiplier"]
    # what ran: rounds 1-3 at z6, rounds 4-9 at the multiplier the resumed run used
    true = _swor_epsilon([(z6 * clip, 2 * clip, 3), (z_new * clip, 2 * clip, 6)], 6, 4)
    assert summary["epsilon"] == pytest.approx(true)
    assert true <= target
    assert summary["privacy"]["noise_multipliers"] == [z6] * 3 + [z_new] * 6
    state = json.loads((tmp_path / "r" / "checkpoints" / "round_00009" / "state.json").read_text())
    assert state["noise_multipliers"] == [z6] * 3 + [z_new] * 6
    rows = _rows(tmp_path / "r")
    assert [r["round"] for r in rows] == list(range(1, 10))
    assert rows[3]["epsilon"] == pytest.approx(
        _swor_epsilon([(z6 * clip, 2 * clip, 3), (z_new * clip, 2 * clip, 1)], 6, 4)
    )


def test_resume_past_the_budget_is_refused_before_the_first_new_round(tmp_path) -> None:
    privacy = {"mode": "central", "target_epsilon": 2.0, "clip_norm": 0.5, "delta": DELTA}
    fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "r", progress=False)
    longer = tiny_config(experiment={"rounds": 6}, privacy=privacy)
    with pytest.raises(ConfigError, match=r"--resume: rounds 1-3 already spent") as err:
        fedguard.run(longer, out=tmp_path / "r", resume=True, progress=False)
    assert "\n" not in str(err.value)
    assert [r["round"] for r in _rows(tmp_path / "r")] == [1, 2, 3]


def test_resume_with_the_same_rounds_repeats_the_uninterrupted_run(tmp_path) -> None:
    privacy = {"mode": "central", "target_epsilon": 2.5, "clip_norm": 0.5, "delta": DELTA}
    cfg = tiny_config(experiment={"rounds": 4}, privacy=privacy, checkpoint={"keep": 4})
    full = fedguard.run(cfg, out=tmp_path / "full", progress=False)
    fedguard.run(cfg, out=tmp_path / "part", progress=False)
    _cut_back_to(tmp_path / "part", 2)
    part = fedguard.run(cfg, out=tmp_path / "part", resume=True, progress=False)
    assert part["privacy"]["noise_multipliers"] == [full["privacy"]["noise_multiplier"]] * 4
    assert part["epsilon"] == full["epsilon"]


def test_budget_check_composes_the_recorded_multipliers(tmp_path) -> None:
    z, clip = 2.0, 0.5
    ran = [(0.8 * clip, 2 * clip, 3)]  # rounds 1-3 as the checkpoint will record them
    limit = 0.5 * (_swor_epsilon(ran, 6, 4) + _swor_epsilon([*ran, (z * clip, 2 * clip, 1)], 6, 4))
    assert _swor_epsilon([(z * clip, 2 * clip, 6)], 6, 4) < limit  # at z throughout: no stop
    privacy = {
        "mode": "central",
        "noise_multiplier": z,
        "clip_norm": clip,
        "delta": DELTA,
        "max_epsilon": limit,
    }
    fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "r", progress=False)
    # rounds 1-3 recorded as run at less noise than the config says
    state_path = tmp_path / "r" / "checkpoints" / "round_00003" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["noise_multipliers"] == [z] * 3
    state["noise_multipliers"] = [0.8, 0.8, 0.8]
    state["digest"]["state_sha256"] = checkpoint._state_digest(state)  # a consistent record
    state_path.write_text(json.dumps(state))
    longer = tiny_config(experiment={"rounds": 6}, privacy=privacy)
    summary = fedguard.run(longer, out=tmp_path / "r", resume=True, progress=False)
    assert summary["status"] == "budget_spent" and summary["rounds_completed"] == 3
    assert summary["epsilon"] == pytest.approx(_swor_epsilon(ran, 6, 4))


# ---------------------------------------------------------------- item 3: adaptive clipping


def _reply(cid: int, norm: float, unclipped: float | None, dim: int = 4) -> messages.FitReply:
    update = torch.zeros(dim)
    update[cid % dim] = norm
    metrics = {"train_loss": 0.0} if unclipped is None else {"dp_unclipped": unclipped}
    return messages.FitReply(1, cid, update, 10, metrics)


def _released_count(replies, *, expected: float = 5.0) -> float:
    """``m * (b - 1/2)`` for the noiseless count the server releases, read back from the
    clip's geometric step ``C' = C exp(-eta (b - gamma))``."""
    eta, gamma, clip = 0.3, 0.4, 2.0
    dp = CentralDP(
        clip_norm=clip,
        noise_multiplier=1.5,
        expected_clients=expected,
        seed=0,
        adaptive=True,
        target_quantile=gamma,
        clip_learning_rate=eta,
        count_stddev=0.0,
    )
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=9, central_dp=dp)
    state = strategy.init(torch.zeros(4))
    state, _ = strategy.aggregate(state, torch.zeros(4), replies, round_=1)
    b = gamma - math.log(float(state.clip_norm[0]) / clip) / eta
    return expected * (b - 0.5)


def test_the_clip_count_is_centred_one_client_moves_it_by_a_half() -> None:
    base = [_reply(0, 1.0, 1.0), _reply(1, 3.0, 0.0), _reply(2, 0.5, 1.0)]
    count = _released_count(base)
    assert count == pytest.approx(2 - 1.5)  # two unclipped of three, centred at 1/2 each
    for added in (_reply(3, 1.0, 1.0), _reply(3, 5.0, 0.0)):  # add an unclipped / clipped one
        assert abs(_released_count([*base, added]) - count) == pytest.approx(0.5)


def test_adaptive_clipping_takes_the_clients_bit_not_the_clipped_norm() -> None:
    # clients clip before sending: the server sees norms at most C and must use their bits
    long_ones = [_reply(i, 2.0, 0.0) for i in range(3)]
    short_ones = [_reply(i, 2.0, 1.0) for i in range(3)]
    assert _released_count(long_ones) == pytest.approx(-1.5)
    assert _released_count(short_ones) == pytest.approx(1.5)
    # a reply the server had to re-clip counts as clipped, whatever its bit says
    assert _released_count([_reply(0, 9.0, 1.0)]) == pytest.approx(-0.5)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_adaptive_clipping_epsilon_from_the_pair_of_gaussians(tmp_path, sampling) -> None:
    z, clip, count_std, rounds = 1.7, 0.3, 1.2, 3
    cfg = tiny_config(
        server={"sampling": sampling, "clients_per_round": 3},
        privacy={
            "mode": "central",
            "noise_multiplier": z,
            "clip_norm": clip,
            "delta": DELTA,
            "adaptive_clip": True,
            "clip_count_stddev": count_std,
        },
    )
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False)
    p = summary["privacy"]
    # the noise on the updates: z_u with z_u^-2 = z^-2 - (2 sigma_b)^-2 (Andrew et al.)
    update_std = (z**-2 - (2 * count_std) ** -2) ** -0.5 * clip
    assert p["noise_stddev"] == pytest.approx(update_std)
    assert p["clip_count_noise_stddev"] == count_std
    # sensitivities from the relation: sum C / count 1/2 (add-or-remove), 2C / 1 (replace-one)
    sum_sens, count_sens = (clip, 0.5) if sampling == "poisson" else (2 * clip, 1.0)
    assert (p["l2_sensitivity"], p["clip_count_sensitivity"]) == pytest.approx(
        (sum_sens, count_sens)
    )
    # two Gaussian queries compose to one whose multiplier^-2 is the sum of theirs
    combined = ((update_std / sum_sens) ** -2 + (count_std / count_sens) ** -2) ** -0.5
    if sampling == "poisson":
        acc = rdp.RdpAccountant()
        one = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(combined))
        acc.compose(dp_accounting.SelfComposedDpEvent(one, rounds))
        true = acc.get_epsilon(DELTA)
    else:
        true = _swor_epsilon([(combined, 1.0, rounds)], 6, 3)
    assert summary["epsilon"] == pytest.approx(true)


# ---------------------------------------------------------------- item 4: augmented copies


def test_local_dp_refuses_augmented_copies_of_recordings() -> None:
    cfg = tiny_config(
        data={"dataset": "fsdd", "augment_copies": 3},
        privacy={"mode": "local", "noise_multiplier": 1.1, "delta": 1e-4},
    )
    with pytest.raises(ConfigError, match=r'privacy.mode = "local".*data.augment_copies = 3'):
        config_mod.validate(cfg)
    central = tiny_config(
        data={"dataset": "fsdd", "augment_copies": 3},
        privacy={"mode": "central", "noise_multiplier": 1.1, "clip_norm": 0.5, "delta": 1e-3},
    )
    config_mod.validate(central)  # user-level DP covers all of a client's copies
