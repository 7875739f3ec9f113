"""The cohort engine (``[runtime] kind = "cohort"``) trains what the in-process engine trains.

Each equality test runs the same experiment (the seed image CNN on 12x12 synthetic images,
Dirichlet-partitioned so that the clients hold different numbers of examples, and a cohort size
that splits each round's clients into unequal chunks) on both engines for three rounds and compares
the final global parameters. The sequential engine is the reference: the cohort engine must
take the same batches, steps, noise and replies, so the only difference left is float rounding
(the same sums batched differently). Tolerances on the largest absolute parameter difference:
``ATOL`` for SGD-type updates (measured: at most 7e-8, about one float32 rounding of the
parameters' size); Adam divides by ``sqrt(v)``, so a coordinate whose gradient is nearly zero
turns a rounding difference into a visible share of ``lr``: ``ADAM_ATOL`` (measured: 1e-5).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_config
from fedguard.algorithms.optimizers import stacked
from fedguard.client import cohort, trainers, training
from fedguard.experiment import config
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError
from fedguard.protocol import messages
from fedguard.simulation.cohort import CohortTransport
from fedguard.simulation.inprocess import InProcessTransport

ATOL = 1e-6
ADAM_ATOL = 1e-4
ROUNDS = 3


def _config(runtime: dict[str, Any], **sections: dict[str, Any]) -> config.ExperimentConfig:
    base = {
        "data": {"num_clients": 6, "synthetic_samples": 360, "synthetic_shape": [1, 12, 12]},
        "model": {"name": "image_cnn"},
        "client": {"lr": 0.05, "batch_size": 8, "epochs": 1},
        "server": {"strategy": "fedavg", "clients_per_round": 5},
        "evaluation": {"every": 0},
    }
    for table, values in sections.items():
        base[table] = {**base.get(table, {}), **values}
    return config.validate(tiny_config(runtime=runtime, **base))


def _rounds(exp: Experiment, rounds: int = ROUNDS) -> tuple[torch.Tensor, list[float | None]]:
    """The global parameters after ``rounds`` rounds and each round's mean training loss (None
    under secure aggregation, which hides the clients' metrics)."""
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    losses = []
    for r in range(1, rounds + 1):
        result = exp.driver.fit_round(r, params, state)
        params, state = result.params, result.state
        losses.append(result.metrics["train_loss"])
    return params, losses


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: small batches gain nothing from two, and on a busy machine two
    spinning threads make these runs many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COHORT = {"kind": "cohort", "cohort_size": 3, "cohort_device": "cpu"}

CASES = {
    "sgd_two_epochs": ({"client": {"epochs": 2}}, ATOL),
    "image_augmentation": ({"client": {"augment": "image"}}, ATOL),
    "fedprox_momentum_decay": (
        {
            "server": {"strategy": "fedprox"},
            "client": {"proximal_mu": 0.5, "momentum": 0.9, "weight_decay": 1e-2},
        },
        ATOL,
    ),
    "adam_max_steps": (
        {"client": {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3, "max_steps": 5}},
        ADAM_ATOL,
    ),
    "dp_sgd": (
        {"privacy": {"mode": "local", "noise_multiplier": 0.8, "max_grad_norm": 0.5}},
        ATOL,
    ),
    "scaffold": ({"server": {"strategy": "scaffold"}}, ATOL),
    "feddyn": ({"server": {"strategy": "feddyn", "feddyn_alpha": 0.1}}, ATOL),
    "fednova": ({"server": {"strategy": "fednova"}, "client": {"momentum": 0.5}}, ATOL),
    "secure_aggregation": (
        {"secure_aggregation": {"enabled": True, "clip_norm": 0.5, "bits": 64}},
        ATOL,
    ),
    "central_dp": (
        {"privacy": {"mode": "central", "noise_multiplier": 0.5, "clip_norm": 0.3}},
        ATOL,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cohort_engine_equals_sequential_engine(case: str) -> None:
    sections, atol = CASES[case]
    sequential = Experiment(_config({}, **sections))
    vectorised = Experiment(_config(COHORT, **sections))
    assert isinstance(sequential.transport, InProcessTransport)
    transport = vectorised.transport
    assert isinstance(transport, CohortTransport)
    sizes = sorted(d.num_train for d in sequential.fed.clients.values())
    assert sizes[0] < sizes[-1]  # unequal clients: the masking is exercised
    assert any(n % 8 for n in sizes)  # and smaller last batches (batch_size 8)
    expected, expected_losses = _rounds(sequential)
    got, losses = _rounds(vectorised)
    assert transport.vectorised == 5 * ROUNDS  # every client trained by the vectorised path
    moved = float((expected - sequential.initial_params).abs().max())
    diff = float((got - expected).abs().max())
    assert moved > 50 * atol  # training changed the model by far more than the tolerance
    assert diff <= atol, f"max abs difference {diff:.3g}"
    if case == "secure_aggregation":  # the server sees no client's metrics
        assert losses == expected_losses == [None] * ROUNDS
    else:
        assert losses == pytest.approx(expected_losses, rel=1e-4)


def test_cohort_dp_sgd_reports_what_ran_and_draws_each_clients_noise() -> None:
    """DP-SGD's report matches the sequential one, and the noise is the client's own: a
    cohort run with another seed (other noise) moves further from the sequential run than the
    tolerance."""
    privacy = {"privacy": {"mode": "local", "noise_multiplier": 0.8, "max_grad_norm": 0.5}}
    sequential = Experiment(_config({}, **privacy))
    vectorised = Experiment(_config(COHORT, **privacy))
    params = sequential.initial_params
    task = {cid: _fit_payload(sequential, cid, params) for cid in (0, 1, 2)}
    plain = sequential.transport.exchange(task, deadline_s=None)
    batched = vectorised.transport.exchange(task, deadline_s=None)
    for a, b in zip(plain, batched, strict=True):
        ra, rb = _reply(a), _reply(b)
        assert rb.metrics == pytest.approx(ra.metrics, rel=1e-5)
        assert float((ra.update - rb.update).abs().max()) <= ATOL
        assert rb.metrics[messages.DP_SGD_RAN_NOISE] == 0.8
    reseeded = {cid: _fit_payload(sequential, cid, params, seed=99) for cid in (0, 1, 2)}
    other = vectorised.transport.exchange(reseeded, deadline_s=None)
    assert float((_reply(other[0]).update - _reply(plain[0]).update).abs().max()) > 100 * ATOL


def _fit_payload(exp: Experiment, cid: int, params: torch.Tensor, seed: int = 7) -> bytes:
    cfg = {**exp.strategy.client_config, "seed": seed + cid}
    return messages.encode(messages.FitTask(1, cid, params, cfg, {}))


def _reply(outcome: Any) -> messages.FitReply:
    assert hasattr(outcome, "payload"), outcome
    return messages.decode(outcome.payload, messages.FitReply)


def _batch_norm_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * (input_shape[1] - 2) * (input_shape[2] - 2), num_classes),
    )


def test_batch_norm_falls_back_to_sequential_with_one_log_line(caplog) -> None:
    sequential = Experiment(_config({}), model_fn=_batch_norm_cnn)
    vectorised = Experiment(_config(COHORT), model_fn=_batch_norm_cnn)
    with caplog.at_level(logging.INFO, logger="fedguard.cohort"):
        got, _ = _rounds(vectorised, 2)
    expected, _ = _rounds(sequential, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedguard.cohort"]
    assert len(lines) == 1 and "BatchNorm2d" in lines[0] and "running statistics" in lines[0]
    transport = vectorised.transport
    assert isinstance(transport, CohortTransport) and transport.vectorised == 0
    assert torch.equal(got, expected)  # the very same sequential code ran


def test_lbfgs_falls_back_with_its_reason(caplog) -> None:
    cfg = {"client": {"optimizer": "lbfgs", "lr": 0.5}, "model": {"name": "logistic_regression"}}
    vectorised = Experiment(_config(COHORT, **cfg))
    sequential = Experiment(_config({}, **cfg))
    with caplog.at_level(logging.INFO, logger="fedguard.cohort"):
        got, _ = _rounds(vectorised, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedguard.cohort"]
    assert lines == [
        'cohort engine: training client by client: optimizer "lbfgs" is not a minibatch method'
    ]
    assert torch.equal(got, _rounds(sequential, 2)[0])


def test_unsupported_reasons() -> None:
    model = Experiment(_config(COHORT)).model
    assert cohort.unsupported_model(model) is None
    plain = training.LocalTraining()
    assert cohort.unsupported_task(trainers.OptimizerTrainer(), plain) is None
    assert "NewtonTrainer" in (cohort.unsupported_task(trainers.NewtonTrainer(), plain) or "")
    with_mu = training.LocalTraining(proximal_mu=0.1)
    assert cohort.unsupported_task(trainers.DPSGDTrainer(), with_mu) == (
        "DP-SGD refuses a proximal term"
    )


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"cohort_size": 8}, "runtime.cohort_size applies to the cohort engine only"),
        ({"cohort_device": "cpu"}, "runtime.cohort_device applies to the cohort engine only"),
        ({"kind": "cohort", "cohort_size": 0}, "runtime.cohort_size"),
        ({"kind": "threads"}, "runtime.kind"),
        ({"kind": "cohort", "cohort_device": "tpu"}, "runtime.cohort_device"),
        ({"kind": "cohort", "size": 3}, "runtime.size: unknown key"),
    ],
)
def test_runtime_config_is_checked(runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.validate(tiny_config(runtime=runtime))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_refused_before_round_1() -> None:
    cfg = config.validate(tiny_config(runtime={"kind": "cohort", "cohort_device": "cuda"}))
    with pytest.raises(ConfigError, match='runtime.cohort_device = "cuda" but torch sees no CUDA'):
        Experiment(cfg)


def _torch_steps(
    p0: torch.Tensor, grads: list[torch.Tensor], active: list[torch.Tensor], make: Any
) -> torch.Tensor:
    """Reference: one ``torch.optim`` optimizer per row, stepping only where ``active``."""
    rows = []
    for i in range(p0.shape[0]):
        p = p0[i].clone().requires_grad_(True)
        opt = make([p])
        for g, on in zip(grads, active, strict=True):
            if on[i]:
                p.grad = g[i].clone()
                opt.step()
        rows.append(p.detach())
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_stacked_optimizers_step_like_torch_optim_and_skip_inactive_rows(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 7, generator=g)
    grads = [torch.randn(3, 7, generator=g) for _ in range(5)]
    active = [torch.tensor([True, True, True])] * 2 + [torch.tensor([True, False, True])] * 3
    state, params = stacked.init([p0], adam=kind == "adam"), [p0.clone()]
    for grad, on in zip(grads, active, strict=True):
        if kind == "adam":
            state, params = stacked.adam(state, params, [grad], on, lr=0.03, weight_decay=0.1)
        else:
            state, params = stacked.sgd(
                state, params, [grad], on, lr=0.03, momentum=0.8, weight_decay=0.1
            )
    if kind == "adam":
        expected = _torch_steps(
            p0, grads, active, lambda ps: torch.optim.Adam(ps, lr=0.03, weight_decay=0.1)
        )
    else:
        expected = _torch_steps(
            p0,
            grads,
            active,
            lambda ps: torch.optim.SGD(ps, lr=0.03, momentum=0.8, weight_decay=0.1),
        )
    assert torch.allclose(params[0], expected, rtol=0, atol=1e-6)
    assert state.steps.tolist() == [5, 2, 5]
    assert not torch.allclose(params[0][1], expected[0])  # rows differ: masking is visible


def test_cohort_size_defaults_to_a_small_cpu_cohort() -> None:
    exp = Experiment(
        config.validate(tiny_config(runtime={"kind": "cohort", "cohort_device": "cpu"}))
    )
    transport = exp.transport
    assert isinstance(transport, CohortTransport)
    assert transport.cohort_size == 8 and transport.device == torch.device("cpu")
