"""Registration, both halves: counts rounded up on the client, refusals on the server (another
model, absurd counts), and the registered sizes driving secure aggregation's weight cap, the
driver's claim cap, the privacy plan and the sampling population of a server without data.

The clients are the tiny experiment's six simulated clients, whose partition sizes are
210, 86, 91, 58, 105 and 50 (a seeded Dirichlet split of 600 synthetic examples); with
``registration.count_bucket = 25`` they register 225, 100, 100, 75, 125 and 50.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError
from fedguard.experiment.data_free import DataFreeExperiment
from fedguard.models import registry as models
from fedguard.protocol import messages, registration
from fedguard.protocol.driver import RoundFailedError
from fedguard.protocol.transport import Transport
from fedguard.simulation.inprocess import InProcessTransport

SIZES = {0: 210, 1: 86, 2: 91, 3: 58, 4: 105, 5: 50}
ROUNDED = {0: 225, 1: 100, 2: 100, 3: 75, 4: 125, 5: 50}  # up to a multiple of 25


def _clients(cfg: dict) -> Experiment:
    """The simulated experiment whose clients answer the data-free server."""
    return Experiment(config_mod.validate(cfg))


def _data_free(cfg: dict, handler=None, **kwargs) -> DataFreeExperiment:
    clients = _clients(cfg)
    handle = clients.app.handle if handler is None else handler(clients.app.handle)

    def transport_fn(ids: list[int]) -> Transport:
        return InProcessTransport(handle, ids)

    return DataFreeExperiment(config_mod.validate(cfg), transport_fn=transport_fn, **kwargs)


def test_the_partition_is_the_one_the_counts_below_assume() -> None:
    exp = _clients(tiny_config())
    assert {cid: d.num_train for cid, d in exp.fed.clients.items()} == SIZES


def test_registered_counts_are_rounded_up_and_cap_weights_and_secure_aggregation() -> None:
    cfg = tiny_config(
        registration={"count_bucket": 25},
        secure_aggregation={"enabled": True, "clip_norm": 5.0},
    )
    exp = _data_free(cfg)
    assert exp.registry.sizes == ROUNDED
    assert exp.registry.eval_sizes == dict.fromkeys(SIZES, 25)  # 20 held-out examples each
    assert exp.driver.registered_examples == ROUNDED
    secure = exp.driver.secure_aggregation
    assert secure is not None and secure.max_weight == 225  # the largest registered count
    assert list(exp.transport.client_ids) == [0, 1, 2, 3, 4, 5]
    # secure_aggregation.max_examples, when set, caps the weight instead
    capped = _data_free(
        {**cfg, "secure_aggregation": {**cfg["secure_aggregation"], "max_examples": 150}}
    )
    assert capped.driver.secure_aggregation is not None
    assert capped.driver.secure_aggregation.max_weight == 150


def test_local_dp_plans_each_client_from_the_conservative_end_of_its_range() -> None:
    privacy = {"mode": "local", "noise_multiplier": 1.1, "delta": 1e-3}
    cfg = tiny_config(privacy=privacy, registration={"count_bucket": 25})
    exp = _data_free(cfg)
    plan = exp.privacy
    assert plan is not None and not plan.sizes_known
    # rate: batch 16 over the smallest size the count allows (count - 24)
    fewest = {0: 201, 1: 76, 2: 76, 3: 51, 4: 101, 5: 26}
    assert plan.rates == {cid: 16 / n for cid, n in fewest.items()}
    # steps: one epoch of the largest size, round(count / 16)
    assert plan.steps_per_round == {0: 14, 1: 6, 2: 6, 3: 5, 4: 8, 5: 3}
    simulated = _clients(cfg).privacy
    assert simulated is not None
    assert simulated.rates == {cid: 16 / n for cid, n in SIZES.items()}
    assert simulated.steps_per_round == {0: 13, 1: 5, 2: 6, 3: 4, 4: 7, 5: 3}
    # without a report, the server accounts more than a client can have spent
    assert plan.epsilon_of([1.1] * 3) > simulated.epsilon_of([1.1] * 3) > 0
    # the default bucket under DP is 100: no exact count leaves a client
    default = _data_free(tiny_config(privacy=privacy))
    assert default.registry.sizes == {0: 300, 1: 100, 2: 100, 3: 100, 4: 200, 5: 100}


def test_user_level_dp_counts_the_registered_clients(caplog) -> None:
    privacy = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3}
    cfg = tiny_config(privacy=privacy)
    assert _data_free(cfg).privacy.num_clients == 6  # type: ignore[union-attr]

    def lose_client_5(handle):
        def answer(cid: int, payload: bytes) -> bytes:
            if cid == 5 and messages.kind_of(payload) == "RegisterTask":
                raise ConnectionError("client 5 is offline")
            return handle(cid, payload)

        return answer

    exp = _data_free(cfg, lose_client_5)
    assert exp.privacy is not None and exp.privacy.num_clients == 5
    assert exp.client_ids == [0, 1, 2, 3, 4]
    assert "client 5 is offline" in exp.registry.refused[5]


def test_another_model_is_refused_on_both_sides() -> None:
    cfg = tiny_config()
    server = _data_free(cfg)
    # the client half: a client whose model has four classes, not three, stops with one line
    other = models.build(
        "logistic_regression", framework="torch", input_shape=(1, 6, 6), num_classes=4, seed=0
    )
    task = messages.RegisterTask(0, 2, {messages.REGISTER_SIGNATURE: server.limits.signature})
    with pytest.raises(registration.RegistrationRefused) as refused:
        registration.registration_reply(task, spec=other.spec, num_examples=91, eval_examples=20)
    text = str(refused.value)
    assert "\n" not in text and "is not this client's" in text and "148 parameters" in text

    # the server half: a client that does not check (or lies) is refused by the server
    def liar(handle):
        def answer(cid: int, payload: bytes) -> bytes:
            reply = handle(cid, payload)
            if cid == 2 and messages.kind_of(payload) == "RegisterTask":
                r = messages.decode(reply, messages.Registration)
                forged = registration.model_signature(other.spec)
                return messages.encode(
                    messages.Registration(0, 2, r.num_examples, r.eval_examples, 1, forged)
                )
            return reply

        return answer

    exp = _data_free(cfg, liar)
    assert 2 not in exp.client_ids and exp.client_ids == [0, 1, 3, 4, 5]
    assert "model signature" in exp.registry.refused[2]
    assert exp.partition()["refused"]["2"].startswith("refused: its model signature")


LIMITS = registration.Limits(signature="s" * 64, model="m", count_bucket=10, max_examples=1000)


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        ((0, 0, 10), "registers no training examples"),
        ((10_000, 0, 10), "more than registration.max_examples = 1,000 (an absurd count)"),
        ((100, 2_000, 10), "2,000 held-out examples, more than"),
        ((105, 20, 10), "not multiples of its bucket 10"),
        ((100, 20, 5), "it rounds its counts to 5, the server asks for at least 10"),
    ],
)
def test_absurd_or_badly_rounded_counts_are_refused(counts, reason) -> None:
    n, e, b = counts
    reply = messages.Registration(0, 1, n, e, b, "s" * 64)
    problem = registration.problem(reply, LIMITS)
    assert problem is not None and reason in problem
    assert registration.problem(messages.Registration(0, 1, 100, 20, 10, "s" * 64), LIMITS) is None


def test_absurd_registrations_leave_the_run_or_stop_it_before_round_1() -> None:
    def inflate(cids):
        def wrap(handle):
            def answer(cid: int, payload: bytes) -> bytes:
                reply = handle(cid, payload)
                if cid in cids and messages.kind_of(payload) == "RegisterTask":
                    r = messages.decode(reply, messages.Registration)
                    return messages.encode(
                        messages.Registration(0, cid, 10**9, r.eval_examples, 1, r.model_signature)
                    )
                return reply

            return answer

        return wrap

    exp = _data_free(tiny_config(), inflate({1}))
    assert exp.client_ids == [0, 2, 3, 4, 5]
    assert "1,000,000,000 training examples" in exp.registry.refused[1]
    with pytest.raises(
        RoundFailedError, match=r"Only 3 of 6 clients registered and were admitted; a round needs 4"
    ):
        _data_free(tiny_config(), inflate({1, 2, 3}))


def test_a_client_rounds_at_least_as_coarsely_as_its_own_configuration_says() -> None:
    exp = _clients(tiny_config(registration={"count_bucket": 40}))
    assert exp.app.pins.count_bucket == 40
    task = messages.RegisterTask(
        0,
        0,
        {
            messages.REGISTER_SIGNATURE: registration.model_signature(exp.model.spec),
            messages.REGISTER_BUCKET: 7,
        },
    )
    reply = exp.app.register(task)
    assert (reply.num_examples, reply.eval_examples, reply.count_bucket) == (240, 40, 40)
    coarser = messages.RegisterTask(0, 0, {**task.config, messages.REGISTER_BUCKET: 100})
    reply = exp.app.register(coarser)
    assert (reply.num_examples, reply.eval_examples, reply.count_bucket) == (300, 100, 100)


def test_registration_fields_of_the_wrong_type_are_refused_at_decode() -> None:
    good = messages.Registration(0, 1, 100, 20, 10, "ab" * 32)
    assert messages.decode(messages.encode(good), messages.Registration) == good
    for bad in (
        messages.Registration(0, 1, 100, 20, 0, "ab" * 32),  # bucket below 1
        messages.Registration(0, 1, -1, 20, 10, "ab" * 32),
        messages.Registration(0, 1, 100, 20, 10, "x" * 200),  # signature too long
        messages.Registration(0, 1, 100.0, 20, 10, "ab" * 32),  # type: ignore[arg-type]
        messages.Registration(0, 1, 100, 20, 10, 7),  # type: ignore[arg-type]
    ):
        with pytest.raises(messages.MessageError):
            messages.decode(messages.encode(bad), messages.Registration)


def test_a_resumed_server_keeps_its_population() -> None:
    cfg = tiny_config(registration={"count_bucket": 25})
    first = _data_free(cfg)
    recorded = first.checkpoint_info()
    assert recorded["registrations"]["0"] == [225, 25, 25]

    def silent_5(handle):
        def answer(cid: int, payload: bytes) -> bytes:
            if cid == 5 and messages.kind_of(payload) == "RegisterTask":
                raise ConnectionError("not back yet")
            return handle(cid, payload)

        return answer

    resumed = _data_free(cfg, silent_5, recorded=recorded)
    assert resumed.client_ids == [0, 1, 2, 3, 4, 5]  # client 5 keeps its recorded registration
    assert resumed.registry.sizes == ROUNDED
    with pytest.raises(ConfigError, match="records no registrations"):
        _data_free(cfg, recorded={"spec": {}})


def test_the_server_config_must_say_what_model_to_build() -> None:
    cfg = tiny_config(data={"dataset": "pneumoniamnist", "path": "missing.npz"})
    with pytest.raises(ConfigError) as missing:
        _data_free_without_clients(cfg)
    assert "model.input_shape and model.num_classes: a server without the data set" in str(
        missing.value
    )
    with pytest.raises(
        ConfigError, match='evaluation.mode = "server" needs evaluation.server_data'
    ):
        _data_free_without_clients(tiny_config(evaluation={"mode": "server"}))


def _data_free_without_clients(cfg: dict) -> DataFreeExperiment:
    def no_transport(ids: list[int]) -> Transport:
        raise AssertionError("the config is refused before any client is asked")

    return DataFreeExperiment(config_mod.validate(cfg), transport_fn=no_transport)


def test_signatures_name_the_layout_not_the_values() -> None:
    a = models.build(
        "logistic_regression", framework="torch", input_shape=(1, 6, 6), num_classes=3, seed=0
    )
    b = models.build(
        "logistic_regression", framework="torch", input_shape=(1, 6, 6), num_classes=3, seed=9
    )
    c = models.build(
        "logistic_regression", framework="torch", input_shape=(1, 6, 7), num_classes=3, seed=0
    )
    assert not torch.equal(a.get_flat(), b.get_flat())
    assert registration.model_signature(a.spec) == registration.model_signature(b.spec)
    assert registration.model_signature(a.spec) != registration.model_signature(c.spec)
    assert len(registration.model_signature(a.spec)) == 64
    assert registration.round_up(91, 25) == 100 and registration.round_up(0, 25) == 0
    assert math.isclose(registration.Registered(100, 25, 25).fewest_examples, 76)
