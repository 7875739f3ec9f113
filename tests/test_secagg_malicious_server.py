"""A server that does not follow the protocol's parameters: the real clients refuse it.

A scripted server drives :class:`~fedguard.protocol.secagg_client.SecAggClient` objects phase by
phase and changes what an honest server would send (threshold, cohort, graph degree, unmasking
lists, DP noise); each change is refused before the client reveals anything. A client advertising
a key no peer can agree with is a dropout, and a run whose rounds all abort does not report
"completed".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fedguard
from conftest import tiny_config
from fedguard.algorithms.privacy import distributed_dp
from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.client.app import RefusedTaskError
from fedguard.experiment import assembly, engines
from fedguard.experiment import config as config_mod
from fedguard.experiment import deployment as grpc_deploy
from fedguard.protocol import messages, secagg, secagg_client, secagg_server
from fedguard.protocol.driver import RoundFailedError
from fedguard.protocol.secagg import Mode, Phase, SecAggError
from fedguard.protocol.transport import Outcome, Transport
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

N, DIM, ROUND, SEED = 8, 40, 5, 21
UPDATES = {
    cid: np.random.default_rng(cid).normal(0, 0.2, DIM).astype(np.float32) for cid in range(N)
}


def _fit(task: messages.FitTask) -> messages.FitReply:
    update = torch.from_numpy(UPDATES[task.client_id])
    return messages.FitReply(task.round, task.client_id, update, 10 + task.client_id)


def _settings(mode: Mode = Mode.SECAGG_PLUS, **changes) -> secagg.Settings:
    neighbours = 5 if mode is Mode.SECAGG_PLUS else None
    base = secagg.Settings(mode, clip_norm=3.0, max_weight=20, neighbours=neighbours)
    return replace(base, **changes)


def _pins(settings: secagg.Settings, **changes) -> secagg.Pins:
    pins = secagg.Pins(settings, client_ids=frozenset(range(N)), min_cohort=N, min_inputs=N - 2)
    return replace(pins, **changes)


def _client(pins: secagg.Pins | None) -> secagg_client.SecAggClient:
    return secagg_client.SecAggClient(_fit, random_bytes=np.random.default_rng(4).bytes, pins=pins)


def _honest_setup(settings: secagg.Settings, sampled: list[int] | None = None) -> secagg.RoundSetup:
    return settings.setup(ROUND, sampled or list(range(N)), graph_seed=SEED, dim=DIM)


class _Server:
    """Runs phases 0-2 of a round with every client honestly, so that phase 3 can be scripted."""

    def __init__(self, client: secagg_client.SecAggClient, setup: secagg.RoundSetup) -> None:
        self.client, self.setup = client, setup
        keys = {u: client.advertise(setup.to_message(u)) for u in setup.sampled}
        public = {u: k.c_public + k.s_public for u, k in keys.items()}
        self.bundles = {}
        for u in setup.sampled:
            peers = sorted(setup.graph[u])
            request = messages.SecAggShareRequest(ROUND, u, {v: public[v] for v in peers}, {})
            self.bundles[u] = client.share(request).ciphertexts

    def mask(self, u: int, config: Mapping[str, messages.Scalar] | None = None):
        ciphertexts = {v: self.bundles[v][u] for v in self.setup.graph[u]}
        seeded = {"seed": 100 + u, **(config or {})}
        request = messages.SecAggMaskRequest(ROUND, u, torch.zeros(DIM), ciphertexts, seeded)
        return self.client.mask(request)


# --- phase 0: the round's public setup ---------------------------------------------------------


def test_a_threshold_of_half_the_holders_or_less_is_refused_even_without_pins() -> None:
    """t = 1 let a server ask one holder for a b-share and another for an s-share of the same
    client, each request consistent on its own, and unmask that client's input exactly."""
    setup = replace(_honest_setup(_settings(Mode.SECAGG)), threshold=1)
    client = _client(None)
    with pytest.raises(SecAggError, match="not more than half of the 8 share holders"):
        client.advertise(setup.to_message(0))
    assert client.states == {}  # no key was made
    half = replace(setup, threshold=4)
    with pytest.raises(SecAggError, match="threshold 4 is not more than half"):
        client.advertise(half.to_message(0))
    client.advertise(replace(setup, threshold=5).to_message(0))  # a majority is accepted


def test_a_threshold_below_the_configured_one_is_refused() -> None:
    settings = _settings(Mode.SECAGG, threshold=7)
    honest = _honest_setup(settings)
    assert honest.threshold == 7
    client = _client(_pins(settings))
    with pytest.raises(SecAggError, match="threshold 6, its configuration needs at least 7"):
        client.advertise(replace(honest, threshold=6).to_message(0))
    client.advertise(honest.to_message(0))
    client.advertise(replace(honest, threshold=8).to_message(1))  # more holders needed: fine


def test_a_fake_peer_or_a_smaller_cohort_is_refused() -> None:
    settings = _settings(Mode.SECAGG)
    client = _client(_pins(settings))
    faked = _honest_setup(settings, [*range(N - 1), 99])  # 99 is the server's own sybil
    with pytest.raises(SecAggError, match=r"sampled clients \[99\] are not in its federation"):
        client.advertise(faked.to_message(0))
    pair = _honest_setup(settings, [0, 1])  # the victim and one peer the server controls
    with pytest.raises(SecAggError, match="2 sampled clients, its configuration needs at least 8"):
        client.advertise(pair.to_message(0))
    assert client.states == {}


@pytest.mark.parametrize(
    ("configured", "sent", "message"),
    [
        (Mode.SECAGG_PLUS, 2, "2 neighbours per client, its configuration gives 5"),
        (Mode.SECAGG_PLUS, 7, "7 neighbours per client, its configuration gives 5"),
        (Mode.SECAGG, 5, "5 neighbours per client, its configuration gives the complete graph"),
    ],
)
def test_a_graph_of_another_degree_is_refused(configured: Mode, sent: int, message: str) -> None:
    settings = _settings(configured)
    honest = _honest_setup(settings)
    holders = sent + 1
    lowered = replace(honest, neighbours=sent, threshold=holders // 2 + 1)
    with pytest.raises(SecAggError, match=message):
        _client(_pins(settings)).advertise(lowered.to_message(0))


def test_a_larger_clip_or_a_weighted_sum_under_user_dp_is_refused() -> None:
    settings = _settings(weighted=False, max_weight=1)
    honest = _honest_setup(settings)
    client = _client(_pins(settings))
    with pytest.raises(SecAggError, match="clip norm 30, its configuration allows at most 3"):
        client.advertise(replace(honest, clip_norm=30.0).to_message(0))
    with pytest.raises(SecAggError, match="its configuration sums unweighted updates"):
        client.advertise(replace(honest, weighted=True, max_weight=20).to_message(0))


# --- phase 3: the unmasking request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "alive", "dropped", "message"),
    [
        (Mode.SECAGG, [*range(N), 42], [], r"clients \[42\], who were not sampled"),
        (Mode.SECAGG, list(range(N - 3)), list(range(N - 3, N)), "fewer than the 6 its config"),
        (Mode.SECAGG_PLUS, list(range(N)), None, "refuses to reveal both shares of client"),
    ],
)
def test_unmask_lists_inconsistent_with_the_round_are_refused(
    mode: Mode, alive: list[int], dropped: list[int] | None, message: str
) -> None:
    """Names outside the round, a client both alive and dropped (here one whose shares client 0
    does not hold: a list that cannot be the truth), or fewer inputs than the pins allow (five
    survivors keep t = 5 holders of the complete graph, but the configuration wants six)."""
    settings = _settings(mode)
    client = _client(_pins(settings))
    setup = _honest_setup(settings)
    server = _Server(client, setup)
    for u in range(N):
        server.mask(u)
    if dropped is None:  # a client outside client 0's neighbourhood, listed alive and dropped
        dropped = [min(set(range(N)) - setup.holders(0))]
    with pytest.raises(SecAggError, match=message):
        client.unmask(messages.SecAggUnmaskRequest(ROUND, 0, alive, dropped))
    reply = client.unmask(messages.SecAggUnmaskRequest(ROUND, 0, list(range(N)), []))
    assert sorted(reply.b_shares) == sorted(setup.holders(0)) and reply.s_shares == {}


def test_both_shares_of_a_peer_are_never_revealed_across_two_requests() -> None:
    settings = _settings(Mode.SECAGG)
    client = _client(_pins(settings))
    server = _Server(client, _honest_setup(settings))
    server.mask(0)
    reply = client.unmask(messages.SecAggUnmaskRequest(ROUND, 0, list(range(N - 1)), [N - 1]))
    assert N - 1 in reply.s_shares and N - 1 not in reply.b_shares
    with pytest.raises(SecAggError, match="has no round 5"):
        client.unmask(messages.SecAggUnmaskRequest(ROUND, 0, list(range(N)), []))


# --- distributed DP: the mask request's noise ---------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (distributed_dp.Skellam(1e-9, N - 2), "noise multiplier 1e-09, its configuration needs"),
        (distributed_dp.Skellam(0.5, 2), "noise shared by 2 clients, its configuration shares it"),
        (distributed_dp.Skellam(0.5, N), "noise shared by 8 clients, its configuration shares it"),
        (None, "the fit task has no distributed DP noise"),
    ],
)
def test_distributed_dp_with_less_noise_or_other_shares_is_refused(sent, message) -> None:
    pinned = distributed_dp.Skellam(0.5, N - 2)
    settings = _settings(weighted=False, max_weight=1, distributed=pinned)
    trained: list[int] = []

    def fit(task: messages.FitTask) -> messages.FitReply:
        trained.append(task.client_id)
        return _fit(task)

    client = secagg_client.SecAggClient(fit, pins=_pins(settings))
    server = _Server(client, _honest_setup(settings))
    config = {} if sent is None else secagg.distributed_config(sent)
    with pytest.raises(SecAggError, match=message):
        server.mask(0, config)
    assert trained == []  # refused before training, so no masked input exists
    masked = server.mask(1, secagg.distributed_config(distributed_dp.Skellam(0.7, N - 2)))
    assert masked.client_id == 1 and trained == [1]  # more noise than configured: fine


# --- local DP (DP-SGD) and plain fit tasks, with the pins the experiment config gives -----------


def test_simulated_clients_pin_local_dp_from_the_experiment_config() -> None:
    privacy = {"mode": "local", "noise_multiplier": 1.2, "max_grad_norm": 0.5, "delta": 1e-3}
    cfg = config_mod.validate(tiny_config(privacy=privacy))
    exp = assembly.Experiment(cfg)
    assert (exp.app.pins.dp_sgd_noise, exp.app.pins.dp_sgd_clip) == (1.2, 0.5)
    params = exp.initial_params

    def task(**config: messages.Scalar) -> bytes:
        return messages.encode(messages.FitTask(1, 0, params, {"seed": 1, **config}))

    cases = [
        ({messages.DP_SGD_NOISE: 0.0, messages.DP_SGD_CLIP: 0.5}, "noise multiplier 0, its"),
        ({messages.DP_SGD_NOISE: 1.2, messages.DP_SGD_CLIP: 5.0}, "gradient clip 5, its"),
        ({}, "the fit task lacks DP-SGD"),
    ]
    for config, message in cases:
        with pytest.raises(RefusedTaskError, match=message):
            exp.app.handle(0, task(**config))
    ok = task(**{messages.DP_SGD_NOISE: 2.0, messages.DP_SGD_CLIP: 0.25})
    reply = messages.decode(exp.app.handle(0, ok), messages.FitReply)
    assert reply.client_id == 0


def test_clients_under_secure_aggregation_refuse_a_plain_fit_task_and_a_lower_threshold() -> None:
    sa = {"enabled": True, "clip_norm": 1.0, "mode": "secagg+", "neighbours": 3}
    exp = assembly.Experiment(config_mod.validate(tiny_config(secure_aggregation=sa)))
    pins = exp.app.pins.secure_aggregation
    assert pins is not None and pins.settings == exp.driver.secure_aggregation
    assert (pins.client_ids, pins.min_cohort) == (frozenset(range(6)), 4)
    plain = messages.FitTask(1, 0, exp.initial_params, {"seed": 1})
    with pytest.raises(RefusedTaskError, match="only under secure aggregation"):
        exp.app.handle(0, messages.encode(plain))
    setup = pins.settings.setup(
        1, [0, 1, 2, 3], graph_seed=9, dim=exp.model.spec.size, nonce=bytes(32)
    )
    assert (setup.neighbours, setup.threshold) == (3, 3)
    exp.app.handle(0, messages.encode(setup.to_message(0)))
    lowered = replace(setup, threshold=2)
    with pytest.raises(SecAggError, match="threshold 2 is not more than half"):
        exp.app.handle(1, messages.encode(lowered.to_message(1)))


def test_a_deployed_demo_client_pins_what_its_toml_says(tmp_path) -> None:
    import tomli_w

    sections = {
        "secure_aggregation": {"enabled": True, "clip_norm": 1.0},
        "privacy": {"mode": "distributed", "noise_multiplier": 0.8, "clip_norm": 1.0},
        "server": {"clients_per_round": 6},
    }
    path = tmp_path / "client.toml"
    path.write_text(tomli_w.dumps(tiny_config(**sections)))
    app = grpc_deploy.demo_app(path, 2)
    pins = app.pins.secure_aggregation
    assert pins is not None and pins.settings.distributed is not None
    assert pins.settings.distributed.noise_multiplier == 0.8 and not pins.settings.weighted
    assert pins.settings.mode is Mode.SECAGG and pins.min_cohort == 6
    simulated = assembly.Experiment(config_mod.load(path)).app.pins
    assert app.pins == simulated and list(app.data) == [2]


LOCAL_DP = {"mode": "local", "noise_multiplier": 1.1, "max_grad_norm": 0.5, "delta": 1e-3}


@pytest.mark.parametrize("max_examples", [500, None])
def test_pins_from_the_config_alone_are_the_simulated_clients_pins(max_examples) -> None:
    sa = {"enabled": True, "clip_norm": 1.0, "mode": "secagg+", "neighbours": 3}
    if max_examples is not None:
        sa["max_examples"] = max_examples
    cfg = config_mod.validate(tiny_config(secure_aggregation=sa, privacy=LOCAL_DP))
    exp = assembly.Experiment(cfg)
    alone = assembly.config_pins(cfg, exp.model, 3, num_train=40)
    simulated = exp.app.pins
    assert simulated.secure_aggregation is not None and alone.secure_aggregation is not None
    if max_examples is None:  # the server's cap is its largest partition, never compared
        cap = simulated.secure_aggregation.settings.max_weight
        assert alone.secure_aggregation.settings.max_weight == 40 != cap
        settings = replace(alone.secure_aggregation.settings, max_weight=cap)
        alone = replace(
            alone, secure_aggregation=replace(alone.secure_aggregation, settings=settings)
        )
    assert alone == simulated
    assert (alone.dp_sgd_noise, alone.dp_sgd_clip) == (1.1, 0.5)


@pytest.mark.parametrize(
    "noise", [{"noise_multiplier": 0.8}, {"target_epsilon": 5.0}], ids=["explicit", "target"]
)
def test_distributed_dp_pins_from_the_config_alone_are_the_simulated_clients_pins(noise) -> None:
    privacy = {"mode": "distributed", "clip_norm": 1.0, "delta": 1e-3, **noise}
    sa = {"enabled": True, "clip_norm": 1.0, "max_examples": 300}
    cfg = config_mod.validate(
        tiny_config(secure_aggregation=sa, privacy=privacy, server={"clients_per_round": 6})
    )
    exp = assembly.Experiment(cfg)
    alone = assembly.config_pins(cfg, exp.model, 1, num_train=30)
    assert alone == exp.app.pins and alone.secure_aggregation is not None
    mechanism = alone.secure_aggregation.settings.distributed
    assert mechanism == exp.privacy.distributed and mechanism.noise_clients == 6


def _own_data(tmp_path, n: int) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.normal(size=(n, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, n))
    return path


def _deployed_client(monkeypatch, tmp_path, *config: Path, n: int = 40):
    """``fedguard client [config] --data ...`` with the server replaced by a capture of its app."""
    from fedguard import cli

    apps: list = []
    monkeypatch.setattr(grpc_deploy, "run_client", lambda settings, app: apps.append(app) or 0)
    token = tmp_path / "client.token"
    token.write_text("t\n")
    args = [*map(str, config), "--server", "127.0.0.1:9", "--client-id", "3", "--insecure"]
    args += ["--token-file", str(token), "--data", str(_own_data(tmp_path, n))]
    code = cli.main(["client", *args, "--model", "logistic_regression", "--num-classes", "3"])
    assert code == 0 and len(apps) == 1
    return apps[0]


def test_a_client_with_its_own_data_pins_the_local_dp_of_its_toml(
    tmp_path, monkeypatch, capsys
) -> None:
    import tomli_w

    path = tmp_path / "client.toml"
    path.write_text(tomli_w.dumps(tiny_config(privacy=LOCAL_DP)))
    app = _deployed_client(monkeypatch, tmp_path, path)
    assert "warning" not in capsys.readouterr().err
    assert (app.pins.dp_sgd_noise, app.pins.dp_sgd_clip) == (1.1, 0.5) and list(app.data) == [3]
    params = torch.zeros(app.model.spec.size)

    def task(noise: float, clip: float) -> bytes:
        config = {"seed": 1, messages.DP_SGD_NOISE: noise, messages.DP_SGD_CLIP: clip}
        return messages.encode(messages.FitTask(1, 3, params, config))

    with pytest.raises(RefusedTaskError, match="noise multiplier 0, its"):
        app.handle(3, task(0.0, 0.5))
    with pytest.raises(RefusedTaskError, match="gradient clip 1, its"):
        app.handle(3, task(1.1, 1.0))
    reply = messages.decode(app.handle(3, task(1.1, 0.5)), messages.FitReply)
    assert reply.client_id == 3 and reply.metrics[messages.DP_SGD_RAN_NOISE] == 1.1


def test_a_client_with_its_own_data_pins_a_target_epsilon_at_its_own_rate(
    tmp_path, monkeypatch
) -> None:
    import tomli_w

    from fedguard.algorithms.privacy import accounting
    from fedguard.client import dp_sgd

    privacy = {"mode": "local", "target_epsilon": 3.0, "max_grad_norm": 0.5, "delta": 1e-3}
    path = tmp_path / "client.toml"
    path.write_text(tomli_w.dumps(tiny_config(privacy=privacy)))
    app = _deployed_client(monkeypatch, tmp_path, path, n=40)
    z = app.pins.dp_sgd_noise
    assert z is not None and z > 0
    # 3 rounds of one epoch in batches of 16 from its 40 records, at rate 16/40 (RDP accountant)
    q, steps = dp_sgd.sampling_rate(40, 16), 3 * dp_sgd.steps_per_epoch(40, 16)
    eps = accounting.epsilon(accounting.SampledGaussian(z, steps, q), 1e-3)
    assert eps == pytest.approx(3.0, rel=1e-2)
    # a client with more records samples each one less often: it needs less noise
    bigger = _deployed_client(monkeypatch, tmp_path, path, n=400)
    assert bigger.pins.dp_sgd_noise is not None and bigger.pins.dp_sgd_noise < z


def test_a_client_with_its_own_data_and_no_toml_warns_that_it_pins_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    app = _deployed_client(monkeypatch, tmp_path)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "holds the server to no privacy settings" in lines[0], lines
    assert app.pins.dp_sgd_noise is None and app.pins.secure_aggregation is None


# --- a peer's invalid key is that peer's dropout ------------------------------------------------

LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


class _BadKey(Transport):
    """Client ``liar``'s advertised ``c`` or ``s`` key is replaced on the way to the server."""

    def __init__(self, inner: Transport, liar: int, key: bytes, which: str) -> None:
        self.inner, self.liar, self.key, self.which = inner, liar, key, which

    @property
    def client_ids(self) -> Sequence[int]:
        return self.inner.client_ids

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        outcomes = self.inner.exchange(requests, deadline_s=deadline_s)
        out = []
        for o in outcomes:
            if o.client_id == self.liar and hasattr(o, "payload"):
                m = messages.decode(o.payload)
                if isinstance(m, messages.SecAggKeys):
                    m = replace(m, **{f"{self.which}_public": self.key})
                    o = replace(o, payload=messages.encode(m))
            out.append(o)
        return out


@pytest.mark.parametrize(
    ("key", "which"),
    [(bytes(32), "c"), (bytes(32), "s"), (LOW_ORDER, "c")],
    ids=["zero-c", "zero-s", "order8-c"],
)
@pytest.mark.parametrize("mode", list(Mode))
def test_a_peer_advertising_an_invalid_key_is_dropped_and_the_rest_sum_exactly(
    key: bytes, which: str, mode: Mode
) -> None:
    with pytest.raises(secagg_crypto.CryptoError, match="low-order"):
        secagg_crypto.check_public_key(key)
    settings = _settings(mode)
    client = _client(_pins(settings))

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(client.handle(messages.decode(payload)))

    liar = 3
    transport = _BadKey(InProcessTransport(handler, list(range(N))), liar, key, which)
    setup = _honest_setup(settings)

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(ROUND, cid, torch.zeros(DIM), ciphertexts, {"seed": cid})

    result = secagg_server.secure_sum(transport, setup, mask_request)
    others = [u for u in range(N) if u != liar]
    assert result.survivors == others
    assert any(c == liar and "invalid advertised key" in r for c, r in result.problems)
    expected = np.zeros(DIM + 1, dtype=np.int64)
    for u in others:
        rng = np.random.default_rng([u, 0x5EC])
        encoded = secagg_quantize.encode(UPDATES[u], 10 + u, setup.fixed_point, rng)
        expected += secagg_quantize.from_ring(encoded, setup.bits)
    assert np.array_equal(result.total, expected[:-1] / setup.fixed_point.scale)  # bit-exact
    assert result.weight == int(expected[-1]) == sum(10 + u for u in others)


# --- a run whose rounds all abort ---------------------------------------------------------------


def _dropping_rounds(monkeypatch, rounds: set[int]) -> None:
    real = engines.InProcessTransport

    class Dropout(PhaseDropout):
        def exchange(self, requests, *, deadline_s):
            first = messages.decode(next(iter(requests.values())))
            self.drops = {Phase.MASK: {0, 1, 2, 3, 4, 5}} if first.round in rounds else {}
            return super().exchange(requests, deadline_s=deadline_s)

    monkeypatch.setattr(engines, "InProcessTransport", lambda *a, **k: Dropout(real(*a, **k), {}))


def test_a_run_whose_rounds_all_abort_fails(tmp_path, monkeypatch) -> None:
    _dropping_rounds(monkeypatch, {1, 2, 3})
    sa = {"enabled": True, "clip_norm": 1.0}
    with pytest.raises(RoundFailedError, match=r"Every round aborted .*rounds \[1, 2, 3\]"):
        fedguard.run(tiny_config(secure_aggregation=sa), out=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_aborted"] == 3
    assert "the model never changed" in summary["error"]


def test_a_run_with_some_aborted_rounds_counts_them(tmp_path, monkeypatch) -> None:
    _dropping_rounds(monkeypatch, {1, 3})
    sa = {"enabled": True, "clip_norm": 1.0}
    summary = fedguard.run(tiny_config(secure_aggregation=sa), out=tmp_path, progress=False)
    assert summary["status"] == "completed" and summary["rounds_aborted"] == 2


def test_a_configured_threshold_of_half_fails_every_round_with_the_reason(tmp_path) -> None:
    sa = {"enabled": True, "clip_norm": 1.0, "threshold": 2}  # 4 clients per round: 2 of 4
    with pytest.raises(RoundFailedError, match="threshold 2 is not more than half of the 4"):
        fedguard.run(tiny_config(secure_aggregation=sa), out=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_aborted"] == 3
