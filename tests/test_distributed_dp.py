"""Distributed DP (Skellam noise shares under secure aggregation): noise, decoding, epsilon, refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant

import fedguard
from conftest import tiny_config
from fedguard.algorithms.privacy import accounting, distributed_dp
from fedguard.experiment import config
from fedguard.protocol import messages, secagg, secagg_client, secagg_server
from fedguard.protocol.secagg import Mode, Phase
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

N, DIM, CLIP = 8, 40_000, 1.0  # updates of norm about 0.8: the clip does not bind
UPDATES = {
    cid: np.random.default_rng(cid).normal(0, 0.004, DIM).astype(np.float32) for cid in range(N)
}
PRIVACY = {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3}


def test_skellam_shares_add_up_to_the_target_variance() -> None:
    mechanism = distributed_dp.Skellam(noise_multiplier=1.5, noise_clients=5)
    levels = 1000.0
    rate = distributed_dp.client_rate(mechanism, levels)
    assert 2 * rate == pytest.approx((1.5 * 1000.0) ** 2 / 5)  # one share: a fifth of the variance
    rng = np.random.default_rng(0)
    total = sum(distributed_dp.skellam_noise(200_000, rate, rng) for _ in range(5))
    assert total.dtype == np.int64
    assert np.var(total) == pytest.approx((1.5 * levels) ** 2, rel=0.02)
    assert abs(float(np.mean(total))) < 0.01 * 1500.0


def test_conditional_rounding_keeps_the_norm_bound_and_is_unbiased() -> None:
    d, c = 2_000, 30.0
    rng = np.random.default_rng(1)
    x = rng.normal(size=d)
    x *= c / np.linalg.norm(x)
    bound = distributed_dp.l2_sensitivity(c, d, distributed_dp.DEFAULT_BETA)
    # Kairouz et al.'s bound: sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)) here
    assert bound == pytest.approx(math.sqrt(900 + 500 + 1.0 * (30 + math.sqrt(d) / 2)))
    draws = np.stack([distributed_dp.conditional_round(x, bound, rng) for _ in range(400)])
    assert float(np.linalg.norm(draws, axis=1).max()) <= bound
    assert float(np.abs(draws.mean(0) - x).max()) < 0.1  # 4.5 sigma of a mean of 400 draws
    with pytest.raises(RuntimeError, match="no rounding within norm"):
        distributed_dp.conditional_round(x, c / 2, rng)


def _client_fit(task: messages.FitTask) -> messages.FitReply:
    return messages.FitReply(
        task.round, task.client_id, torch.from_numpy(UPDATES[task.client_id]), 5
    )


def _secure_sum(
    mechanism: distributed_dp.Skellam,
    drops: dict[Phase, frozenset[int]] | None = None,
    mode: Mode = Mode.SECAGG_PLUS,
    server_mechanism: distributed_dp.Skellam | None = None,
) -> tuple[secagg_server.SecureSum, secagg.RoundSetup]:
    rng = np.random.default_rng(7)
    client = secagg_client.SecAggClient(_client_fit, random_bytes=rng.bytes)

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(client.handle(messages.decode(payload)))

    transport = PhaseDropout(InProcessTransport(handler, list(range(N))), drops or {})
    settings = secagg.Settings(
        mode,
        clip_norm=CLIP,
        max_weight=1,
        weighted=False,
        distributed=server_mechanism or mechanism,
    )
    setup = settings.setup(3, list(range(N)), graph_seed=5, dim=DIM)
    config_ = secagg.distributed_config(mechanism)

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(3, cid, torch.zeros(DIM), ciphertexts, config_)

    return secagg_server.secure_sum(transport, setup, mask_request), setup


def test_unmasked_sum_is_the_true_sum_plus_noise_of_the_total_variance() -> None:
    mechanism = distributed_dp.Skellam(noise_multiplier=0.02, noise_clients=N)
    result, setup = _secure_sum(mechanism)
    levels = setup.fixed_point.scale * CLIP
    assert levels == 2**20  # the cap: 32 bits leave room for far more
    assert result.weight == N and result.survivors == list(range(N))
    noise = (result.total - sum(UPDATES.values()).astype(np.float64)) * setup.fixed_point.scale
    # N shares of variance (z c)^2 / N each, plus at most N/4 of rounding per coordinate
    target = (0.02 * levels) ** 2
    assert np.var(noise) == pytest.approx(target, rel=0.03)
    assert abs(float(noise.mean())) < 4 * math.sqrt(target / DIM)


def test_a_round_with_fewer_inputs_than_noise_shares_is_aborted_unrevealed() -> None:
    mechanism = distributed_dp.Skellam(noise_multiplier=1.0, noise_clients=N - 1)
    result, _ = _secure_sum(mechanism, {Phase.MASK: frozenset({2})}, Mode.SECAGG)
    assert result.survivors == [c for c in range(N) if c != 2]
    with pytest.raises(secagg.SecAggAbortedError, match="6 clients left, the round needs 7"):
        _secure_sum(mechanism, {Phase.MASK: frozenset({2, 5})}, Mode.SECAGG)


def test_clients_refuse_to_unmask_fewer_inputs_than_noise_shares(caplog) -> None:
    # a server that believes one noise share suffices goes on to unmasking with 7 of 8 inputs;
    # every client, told to expect 8 shares, refuses, so no share arrives and nothing is unmasked
    mechanism = distributed_dp.Skellam(noise_multiplier=1.0, noise_clients=N)
    careless = distributed_dp.Skellam(noise_multiplier=1.0, noise_clients=1)
    with pytest.raises(secagg.SecAggAbortedError, match="only 0 shares of client 0 arrived"):
        _secure_sum(mechanism, {Phase.MASK: frozenset({2})}, Mode.SECAGG, careless)
    assert "a sum of 7 inputs, fewer than the 8 whose noise" in caplog.text


def test_skellam_epsilon_is_slightly_above_the_gaussian_one_at_the_same_noise() -> None:
    z, d, rounds, delta = 1.2, 10_000, 20, 1e-5
    levels = 2.0**20
    l2 = _rounding_bound(levels, d)
    d1 = min(l2 * l2, math.sqrt(d) * l2)
    assert distributed_dp.l2_sensitivity(levels, d, distributed_dp.DEFAULT_BETA) == pytest.approx(
        l2, rel=1e-12
    )
    assert distributed_dp.l1_sensitivity(l2, d) == pytest.approx(d1, rel=1e-12)
    mu = (z * levels) ** 2 / 2
    skellam = accounting.SkellamSum(l2, d1, mu, rounds)
    # golden RDP at order 2: 2 D2^2 / (4 mu) + min((4 D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))
    one = 2 * l2**2 / (4 * mu) + min((4 * l2**2 + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))
    assert skellam.rdp()[0] == pytest.approx(rounds * one)
    orders = np.array(accounting.SKELLAM_ORDERS)
    np.testing.assert_allclose(skellam.rdp(), rounds * _rdp_one_round(orders, l2, d1, mu))
    gaussian = rdp.RdpAccountant(orders=accounting.SKELLAM_ORDERS)
    gaussian.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds))
    expected = gaussian.get_epsilon(delta)
    got = accounting.skellam_epsilon(skellam, delta)
    assert expected < got < 1.01 * expected
    assert accounting.skellam_epsilon(skellam.__class__(l2, d1, mu, 0), delta) == 0.0


def _rdp_one_round(orders: np.ndarray, l2: float, l1: float, mu: float) -> np.ndarray:
    """Agarwal et al. 2021, section 3: the Skellam sum Sk(mu, mu) (variance 2 mu) with L2 and L1
    sensitivities l2, l1, at integer order a:
    a l2^2 / (4 mu) + min((2 a l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))."""
    return orders * l2**2 / (4 * mu) + np.minimum(
        (2 * orders * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu)
    )


def _rounding_bound(levels: float, dim: int) -> float:
    """Kairouz et al. 2021's conditional-rounding norm bound at beta = exp(-1/2), where
    sqrt(2 ln(1 / beta)) = 1: sqrt(min(c^2 + d/4 + (c + sqrt(d)/2), (c + sqrt(d))^2))."""
    return math.sqrt(
        min(levels**2 + dim / 4 + (levels + math.sqrt(dim) / 2), (levels + math.sqrt(dim)) ** 2)
    )


def _direct_epsilon(rounds: int) -> float:
    """The run's epsilon from the formulas, with the numbers worked out here: 4 clients per
    round, none may drop (m = 4 noise shares), z = 1, C = 0.5, a 32-bit ring, and the model
    (logistic regression on 1x6x6 inputs, 3 classes) has d = 3 * 36 + 3 = 111 parameters."""
    n = m = 4
    z, dim = 1.0, 111
    # Ring headroom: s C = (2^31 - 1 - n) / (n + 8 z sqrt(n / m)) = 2,147,483,643 / 12, about
    # 1.8e8, above the cap of 2^20 levels, so c = s C = 2^20.
    uncapped = (2**31 - 1 - n) / (n + 8 * z * math.sqrt(n / m))
    assert uncapped > 2**20
    levels = 2.0**20
    l2 = _rounding_bound(levels, dim)
    assert levels < l2 < levels + 2  # c + (d/4 + c + sqrt(d)/2) / (2c) = c + 0.5 + 3e-5
    l1 = min(l2 * l2, math.sqrt(dim) * l2)  # = sqrt(111) l2, the smaller here
    mu = (z * levels) ** 2 / 2  # total noise Sk(mu, mu): variance 2 mu = (z c)^2
    orders = np.arange(2, 257)  # integer orders, as the bound requires
    # Fixed-size cohorts: neighbouring populations' cohorts differ by one replacement, so the
    # sum moves by the difference of two clients' vectors, twice one client's L2 and L1 bounds.
    curve = rounds * _rdp_one_round(orders, 2 * l2, 2 * l1, mu)
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, curve, 1e-3)
    return float(eps)


def test_run_reports_the_directly_accounted_epsilon(tmp_path) -> None:
    cfg = tiny_config(privacy=PRIVACY, secure_aggregation={"enabled": True})
    summary = fedguard.run(cfg, out=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [_direct_epsilon(r) for r in (1, 2, 3)]
    assert summary["status"] == "completed" and math.isfinite(summary["epsilon"])
    assert [r["epsilon"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert summary["epsilon"] == pytest.approx(expected[2], rel=1e-9)
    assert 1.0 < expected[0] < expected[1] < expected[2] < 20.0
    p = summary["privacy"]
    assert p["mechanism"] == "distributed_skellam" and p["noise_clients"] == 4
    assert p["neighboring_relation"] == "replace_one"
    assert p["l2_sensitivity"] == pytest.approx(2 * _rounding_bound(2.0**20, 111), rel=1e-12)
    assert math.isfinite(summary["test_loss"])


def test_target_epsilon_calibrates_the_skellam_noise(tmp_path) -> None:
    privacy = {**PRIVACY, "noise_multiplier": None, "target_epsilon": 5.0}
    privacy.pop("noise_multiplier")
    summary = fedguard.run(
        tiny_config(privacy=privacy, secure_aggregation={"enabled": True}),
        out=tmp_path,
        progress=False,
    )
    assert summary["epsilon"] <= 5.0 and summary["epsilon"] > 4.9
    assert summary["privacy"]["noise_calibrated_to_target"] is True


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"secure_aggregation": {"enabled": False}}, "needs secure_aggregation.enabled = true"),
        ({"server": {"sampling": "poisson"}}, 'server.sampling = "fixed"'),
        ({"privacy": {**PRIVACY, "accountant": "pld"}}, 'privacy.accountant = "rdp"'),
        ({"privacy": {**PRIVACY, "adaptive_clip": True}}, "needs a fixed privacy.clip_norm"),
        (
            {"secure_aggregation": {"enabled": True, "clip_norm": 2.0}},
            "with distributed DP the clients clip once",
        ),
        ({"server": {"strategy": "scaffold"}}, "SCAFFOLD control variates"),
    ],
)
def test_incompatible_distributed_settings_fail_before_round_one(
    sections: dict, message: str
) -> None:
    cfg = tiny_config(privacy=PRIVACY, secure_aggregation={"enabled": True})
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)
