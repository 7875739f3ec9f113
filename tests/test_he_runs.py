"""``[secure_aggregation] mode = "ckks"`` through the experiment: runs, keys, DP and refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import tenseal as ts
import torch

import fedguard
from conftest import driven_params, tiny_config
from fedguard.algorithms.he import encryption
from fedguard.experiment import config
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError
from fedguard.protocol import he, messages

CLIP = 0.05


def _he(scheme: str, **extra) -> dict:
    return {"enabled": True, "mode": "ckks", "he_scheme": scheme, "clip_norm": CLIP, **extra}


@pytest.mark.parametrize(("scheme", "tolerance"), [("bfv", 1e-6), ("ckks", 1e-4)])
def test_an_he_run_equals_the_plain_run_with_the_same_clip(scheme: str, tolerance: float) -> None:
    """Two rounds of FedAvg under HE land where plain FedAvg with the same client clip lands:
    BFV within its fixed-point step, CKKS within its noise."""
    data = {"num_clients": 8}
    server = {"clients_per_round": 5}
    secure = Experiment(
        config.validate(tiny_config(server=server, data=data, secure_aggregation=_he(scheme)))
    )
    plain = Experiment(config.validate(tiny_config(server=server, data=data)))
    unclipped = driven_params(plain, 2)
    plain.driver.strategy = replace(
        plain.strategy, client_config={**plain.strategy.client_config, messages.DP_CLIP_NORM: CLIP}
    )
    expected = driven_params(plain, 2)
    got = driven_params(secure, 2)
    moved = float((expected - plain.initial_params).abs().max())
    assert float((got - expected).abs().max()) < tolerance * max(moved, 1.0)
    assert not torch.allclose(expected, unclipped, rtol=1e-3)  # the clip did bind
    assert isinstance(secure.driver.secure_aggregation, he.Settings)


def test_the_server_side_holds_no_key_and_cannot_decrypt() -> None:
    exp = Experiment(config.validate(tiny_config(secure_aggregation=_he("bfv"))))
    server_ctx = exp.driver.he_context
    assert server_ctx is not None and not encryption.can_decrypt(server_ctx)
    contexts = [v for v in vars(exp.driver).values() if hasattr(v, "has_secret_key")]
    assert contexts == [server_ctx]  # the driver holds no other context, and no key
    # a real client ciphertext, made with the client side's key (a verified round: a nonce)
    settings = exp.driver.secure_aggregation
    request = settings.request(1, 0, 4, exp.initial_params, {"seed": 1}, {}, bytes(32))
    reply = exp.app.he.encrypt(request)
    blob = reply.ciphertexts[0]
    with pytest.raises(ValueError, match="secret"):
        ts.bfv_vector_from(server_ctx, blob).decrypt()  # TenSEAL refuses: no secret key
    assert exp.app.he.has_key
    key = exp.app.he._key  # the client side's: it decrypts the same ciphertext
    assert ts.bfv_vector_from(key, blob).decrypt()[:3] is not None


def test_a_simulated_he_run_trains_like_the_plain_run(tmp_path) -> None:
    base = {"experiment": {"name": "tiny", "seed": 3, "rounds": 6}}
    plain = fedguard.run(tiny_config(**base), out=tmp_path / "p", progress=False)
    secure = fedguard.run(
        tiny_config(**base, secure_aggregation=_he("bfv", clip_norm=5.0)),
        out=tmp_path / "s",
        progress=False,
    )
    assert secure["status"] == "completed" and secure["rounds_completed"] == 6
    assert abs(secure["test_accuracy"] - plain["test_accuracy"]) < 0.02
    assert secure["test_accuracy"] > 0.5  # 3 classes: chance is 1/3
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    # each client uploads one 4096-slot BFV ciphertext (about 62 kB) for the model's 111
    # parameters and its weight, whatever the model's size below 4096
    assert all(r["bytes_up"] > 4 * 50_000 for r in rows)
    assert not list((tmp_path / "s").rglob("*.key"))


def test_central_dp_under_he_matches_central_dp(tmp_path) -> None:
    privacy = {"mode": "central", "noise_multiplier": 0.8, "clip_norm": 0.05}
    sa = {"enabled": True, "mode": "ckks", "bits": 36}  # BFV, 36 + log2(4) + 1 < 40 bits
    secure = fedguard.run(
        tiny_config(privacy=privacy, secure_aggregation=sa), out=tmp_path / "s", progress=False
    )
    plain = fedguard.run(tiny_config(privacy=privacy), out=tmp_path / "p", progress=False)
    assert secure["status"] == "completed" and secure["rounds_completed"] == 3
    assert secure["epsilon"] == pytest.approx(plain["epsilon"]) and secure["epsilon"] > 0
    # the same noise on a sum equal up to the fixed-point step (36 bits)
    assert secure["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)


def test_distributed_dp_under_bfv_runs_and_is_accounted(tmp_path) -> None:
    privacy = {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 0.5}
    sa = {"enabled": True, "mode": "ckks", "he_scheme": "bfv"}
    out = fedguard.run(
        tiny_config(privacy=privacy, secure_aggregation=sa), out=tmp_path / "d", progress=False
    )
    assert out["status"] == "completed" and out["rounds_completed"] == 3
    # accounted exactly as the same Skellam noise under masking
    masked = fedguard.run(
        tiny_config(privacy=privacy, secure_aggregation={"enabled": True}),
        out=tmp_path / "m",
        progress=False,
    )
    assert out["epsilon"] == pytest.approx(masked["epsilon"]) and 0 < out["epsilon"] < 1000


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"server": {"aggregator": "krum", "byzantine_f": 1, "clients_per_round": 6}},
            "compares individual updates",
        ),
        ({"contribution": {"method": "leave_one_out"}}, "scores each client's update"),
        (
            {
                "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 0.5},
                "secure_aggregation": {"he_scheme": "ckks", "clip_norm": 0.5},
            },
            'set he_scheme = "bfv"',
        ),
        ({"secure_aggregation": {"threshold": 2}}, "is a masking setting"),
        ({"runtime": {"kind": "ray"}}, 'runtime.kind = "ray"'),
    ],
    ids=["robust rule", "contribution", "ddp with ckks", "threshold", "ray"],
)
def test_refusals_before_round_1(sections: dict, message: str) -> None:
    sa = {
        "enabled": True,
        "mode": "ckks",
        "clip_norm": 1.0,
        **sections.pop("secure_aggregation", {}),
    }
    with pytest.raises((ValueError, ConfigError), match=message):
        Experiment(config.validate(tiny_config(secure_aggregation=sa, **sections)))


def test_he_settings_are_refused_under_masking() -> None:
    sa = {"enabled": True, "mode": "secagg", "clip_norm": 1.0, "he_scheme": "ckks"}
    with pytest.raises(ValueError, match='only applies to mode = "ckks"'):
        config.validate(tiny_config(secure_aggregation=sa))


def test_a_cohort_too_large_for_the_plain_modulus_is_refused() -> None:
    sa = {"enabled": True, "mode": "ckks", "clip_norm": 1.0, "bits": 38}
    with pytest.raises(ConfigError, match="set bits to at most"):
        Experiment(config.validate(tiny_config(secure_aggregation=sa)))


def test_the_cohort_engine_runs_he_rounds_like_the_in_process_simulator(tmp_path) -> None:
    sa = _he("bfv", clip_norm=5.0)
    cohort = fedguard.run(
        tiny_config(runtime={"kind": "cohort"}, secure_aggregation=sa),
        out=tmp_path / "c",
        progress=False,
    )
    inprocess = fedguard.run(tiny_config(secure_aggregation=sa), out=tmp_path / "i", progress=False)
    assert cohort["status"] == "completed" and cohort["rounds_completed"] == 3
    # the vectorised training differs from the sequential one in float rounding only
    assert cohort["test_loss"] == pytest.approx(inprocess["test_loss"], rel=1e-4)
