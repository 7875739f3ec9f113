"""Personalisation: fine-tuning, Ditto, FedRep and FedPer (fedguard.client.personal and the
server halves in fedguard.protocol.shared_part and personal_eval), against references written
here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fedguard
from conftest import metric_rows, tiny_config
from fedguard.client import personal
from fedguard.client.data import ClientData
from fedguard.client.trainer import TrainTask
from fedguard.client.trainers import OptimizerTrainer
from fedguard.data.dataset import ArrayDataset, DatasetSplits
from fedguard.experiment import federation, plots
from fedguard.experiment.config import ConfigError, validate
from fedguard.models.registry import adapt
from fedguard.protocol import fedopt, messages
from fedguard.protocol.shared_part import SharedPart
from fedguard.protocol.strategy import StrategyKind


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch) -> None:
    """These runs test numbers, not pictures: drawing a run's PNGs costs more than its rounds."""
    for name in ("write_run_plots", "partition_plot", "confusion_plot"):
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: None)


def tiny_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten, a hidden layer of 5, the head: two layers, so a body and a head."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(torch.tensor(input_shape).prod()), 5),
        nn.Tanh(),
        nn.Linear(5, num_classes),
    )


def _personal_config(method: str, **extra) -> dict:
    cfg = tiny_config(
        data={"client_eval_fraction": 0.3, "alpha": 0.1},
        personalization={"method": method, **extra},
    )
    return cfg


def _task(model, config: dict, state: dict, seed: int = 5) -> TrainTask:
    params = model.get_flat()
    return TrainTask(0, 1, params, config, {}, torch.Generator().manual_seed(seed), state)


def _data(n: int = 12, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData(x, y, x[:4], y[:4])


def test_ditto_personal_update_is_one_proximal_sgd_step() -> None:
    torch.manual_seed(0)
    model = adapt(nn.Linear(4, 3), input_shape=(4,))
    w = model.get_flat().clone()
    v0 = w + 0.25 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    lr, lam = 0.3, 0.7
    settings = personal.PersonalSettings(personal.Method.DITTO, epochs=1, ditto_lambda=lam)
    # one batch holds every example: one step per epoch, whatever the shuffle
    config = {"lr": lr, "batch_size": 64, "epochs": 1, **settings.config()}
    state = {personal.STATE: v0.clone()}
    data = _data()
    result = personal.PersonalizedTrainer(OptimizerTrainer()).train(
        model, data, _task(model, config, state)
    )

    def loss_grad(flat: torch.Tensor) -> torch.Tensor:
        p = flat.clone().requires_grad_(True)
        weight, bias = p[:12].view(3, 4), p[12:]
        loss = nn.functional.cross_entropy(data.train_x @ weight.T + bias, data.train_y)
        (g,) = torch.autograd.grad(loss, p)
        return g

    expected_personal = v0 - lr * (loss_grad(v0) + lam * (v0 - w))
    torch.testing.assert_close(state[personal.STATE], expected_personal, rtol=1e-5, atol=1e-6)
    # the global model trains as usual: its update is plain SGD's from w, without the term
    torch.testing.assert_close(result.update, -lr * loss_grad(w), rtol=1e-5, atol=1e-6)


def _two_layer_model():
    torch.manual_seed(2)
    return adapt(tiny_mlp((4,), 3), input_shape=(4,))


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_the_head_never_leaves_the_client_and_its_personal_head_moves(method: str) -> None:
    model = _two_layer_model()
    settings = personal.PersonalSettings(personal.Method(method), epochs=2)
    head = personal.head_mask(model, settings)
    # the default head is the last layer, "3." of the Sequential: 5 * 3 weights and 3 biases
    assert int(head.sum()) == 18 and bool(head[-18:].all())
    config = {"lr": 0.2, "batch_size": 4, "epochs": 1, **settings.config()}
    w = model.get_flat().clone()
    own_head = w + 0.5
    for state in ({}, {personal.STATE: own_head.clone()}):
        model.set_flat(w)
        result = personal.PersonalizedTrainer(OptimizerTrainer()).train(
            model, _data(), _task(model, config, state)
        )
        assert bool((result.update[head] == 0).all())
        assert float(result.update[~head].abs().sum()) > 1e-3  # the body does train
        start = w if not state else torch.where(head, own_head, w)
        moved = state[personal.STATE][head] - start[head]
        assert float(moved.abs().sum()) > 1e-3  # the personal head trained, and stayed here


def _reply(cid: int, update: torch.Tensor) -> messages.FitReply:
    return messages.FitReply(round=1, client_id=cid, update=update, num_examples=10 + cid)


@pytest.mark.parametrize("kind", [StrategyKind.FEDAVG, StrategyKind.FEDADAM])
def test_the_aggregate_does_not_depend_on_the_clients_head_values(kind: StrategyKind) -> None:
    head = torch.tensor([False, False, True, True, False, True])
    strategy = SharedPart(fedopt.create(kind, client_config={}, num_clients=3), head)
    params = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0])
    g = torch.Generator().manual_seed(3)
    updates = [torch.randn(6, generator=g) for _ in range(3)]
    state = strategy.init(params)
    _, plain = strategy.aggregate(state, params, [_reply(i, u) for i, u in enumerate(updates)])
    changed = [u.clone() for u in updates]
    changed[1][head] = torch.tensor([100.0, -7.0, 3.5])  # one client's head values
    _, other = strategy.aggregate(state, params, [_reply(i, u) for i, u in enumerate(changed)])
    assert torch.equal(plain, other)
    assert torch.equal(plain[head], params[head])  # the global head stays where it was
    if kind is StrategyKind.FEDAVG:  # the body is the weighted mean, written out here
        weights = torch.tensor([10.0, 11.0, 12.0])
        mean = sum(wt * u for wt, u in zip(weights, updates, strict=True)) / weights.sum()
        torch.testing.assert_close(plain[~head], params[~head] + mean[~head])
    total = sum(changed)
    _, summed = strategy.aggregate_sum(state, params, total, 3.0)
    _, summed_plain = strategy.aggregate_sum(state, params, sum(updates), 3.0)
    torch.testing.assert_close(summed, summed_plain)
    assert torch.equal(summed[head], params[head])


def _final(folder) -> dict[str, torch.Tensor]:
    last = sorted((folder / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "tensors.safetensors"))


def test_fedper_run_keeps_the_global_head_and_each_client_its_own(tmp_path) -> None:
    cfg = _personal_config("fedper")
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False, model_fn=tiny_mlp)
    tensors = _final(tmp_path / "r")
    first = _final_initial(cfg)
    head_size = 5 * 3 + 3
    assert torch.equal(tensors["params"][-head_size:], first[-head_size:])
    heads = [v[-head_size:] for k, v in tensors.items() if k.endswith("." + personal.STATE)]
    assert len(heads) == 6  # every client took part (4 per round, 3 rounds) and kept its head
    assert all(float((h - first[-head_size:]).abs().max()) > 1e-3 for h in heads)
    assert summary["personalization"] == "fedper"
    assert summary["personal_accuracy_mean"] > summary["global_accuracy_mean"]


def _final_initial(cfg: dict) -> torch.Tensor:
    from fedguard.experiment.assembly import Experiment

    exp = Experiment(validate(cfg), model_fn=tiny_mlp)
    try:
        return exp.initial_params
    finally:
        exp.close()


def overlapping_classes() -> DatasetSplits:
    """Three classes of 6 features whose Gaussians overlap (one model cannot tell them apart
    well), so that a client holding mostly one class gains from a model of its own."""
    rng = np.random.default_rng(7)

    def draw(n: int) -> ArrayDataset:
        y = rng.integers(0, 3, n)
        x = (rng.normal(size=(n, 6)) + 0.5 * np.eye(3, 6)[y]).astype(np.float32)
        return ArrayDataset(x, y.astype(np.int64))

    return DatasetSplits("overlapping", draw(900), draw(300), 3)


def test_finetune_beats_the_global_model_on_a_skewed_partition(tmp_path) -> None:
    cfg = _personal_config("finetune", epochs=3)
    cfg["data"]["alpha"] = 0.3
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False, data_fn=overlapping_classes)
    rows = metric_rows(tmp_path / "r")
    assert all(r["personal_accuracy_mean"] is not None for r in rows)
    last = rows[-1]
    clients = last["personal_clients"]
    assert [c["client"] for c in clients] == list(range(6))
    personal_acc = [c["personal_accuracy"] for c in clients]
    global_acc = [c["global_accuracy"] for c in clients]
    assert last["personal_accuracy_mean"] == pytest.approx(sum(personal_acc) / 6)
    assert last["personal_accuracy_worst"] == min(personal_acc)
    assert last["global_accuracy_worst"] == min(global_acc)
    assert summary["personal_accuracy_mean"] == last["personal_accuracy_mean"]
    # only clients that hold out examples of their own evaluate their personal model
    held = [federation.holds_out(n, f) for n, f in ((1, 0.3), (2, 0.3), (2, 0.8))]
    assert held == [False, True, False]  # round(0.3), round(0.6), round(1.6) of 1, 2, 2
    # measured: personal 0.646 mean / 0.333 worst, global 0.452 / 0.0
    assert last["personal_accuracy_mean"] >= last["global_accuracy_mean"] + 0.15
    assert last["personal_accuracy_worst"] > last["global_accuracy_worst"]


def test_ditto_resume_continues_identically(tmp_path) -> None:
    cfg = _personal_config("ditto", ditto_lambda=0.3)
    cfg["experiment"]["rounds"] = 4
    fedguard.run(cfg, out=tmp_path / "full", progress=False)
    short = json.loads(json.dumps(cfg))
    short["experiment"]["rounds"] = 2
    fedguard.run(short, out=tmp_path / "part", progress=False)
    fedguard.run(cfg, out=tmp_path / "part", resume=True, progress=False)

    def rows(name: str) -> list[dict]:
        out = metric_rows(tmp_path / name)
        for r in out:
            r.pop("seconds")
        return out

    assert rows("full") == rows("part")
    full, part = _final(tmp_path / "full"), _final(tmp_path / "part")
    assert full.keys() == part.keys() and any(k.endswith(".personal") for k in full)
    assert all(torch.equal(full[k], part[k]) for k in full)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"personalization": {"method": "mixture"}}, "personalization.method"),
        (
            {"personalization": {"method": "fedrep"}, "server": {"strategy": "scaffold"}},
            "keeps client state over the whole model",
        ),
        (
            {
                "personalization": {"method": "ditto"},
                "privacy": {"mode": "local", "noise_multiplier": 1.0},
            },
            "cannot run under privacy.mode",
        ),
        ({"personalization": {"method": "fedper", "ditto_lambda": 0.5}}, "ditto_lambda is set"),
        (
            {"personalization": {"method": "finetune"}, "client": {"optimizer": "newton"}},
            'client.optimizer = "newton"',
        ),
        ({"personalization": {"method": "ditto", "ditto_lambda": -1.0}}, "ditto_lambda"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_the_reason(sections, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(**sections))


def test_a_head_that_names_no_layer_or_no_held_out_split_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="matches no trainable tensor"):
        fedguard.run(
            _personal_config("fedrep", head=["decoder."]),
            out=tmp_path / "a",
            progress=False,
            model_fn=tiny_mlp,
        )
    with pytest.raises(ConfigError, match="matches every trainable tensor"):  # one layer only
        fedguard.run(_personal_config("fedper"), out=tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="client_eval_fraction"):
        fedguard.run(
            tiny_config(personalization={"method": "ditto"}), out=tmp_path / "c", progress=False
        )


@pytest.mark.parametrize(
    "sections",
    [
        {"secure_aggregation": {"enabled": True, "clip_norm": 5.0}},
        {"server": {"aggregator": "median", "byzantine_f": 1}},
        {"privacy": {"mode": "local", "noise_multiplier": 1.0, "delta": 1e-3}},
        {
            "privacy": {"mode": "central", "noise_multiplier": 0.5, "clip_norm": 2.0},
            "personalization": {"method": "fedrep", "epochs": 2},
        },
    ],
    ids=["secure_aggregation", "median", "local_dp", "fedrep_central_dp"],
)
def test_fedper_composes_with_secure_robust_and_private_aggregation(tmp_path, sections) -> None:
    cfg = _personal_config("fedper")
    cfg["experiment"]["rounds"] = 2
    for table, values in sections.items():
        cfg.setdefault(table, {}).update(values)
    summary = fedguard.run(cfg, out=tmp_path / "r", progress=False, model_fn=tiny_mlp)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    params = _final(tmp_path / "r")["params"]
    first = _final_initial(cfg)
    head = torch.zeros_like(first, dtype=torch.bool)
    head[-18:] = True
    assert torch.equal(params[head], first[head])  # only the body was aggregated
    assert float((params[~head] - first[~head]).abs().max()) > 1e-4
    assert summary["personal_accuracy_mean"] is not None
    if "privacy" in sections:
        assert summary["epsilon"] > 0  # the planned DP-SGD ran and was composed


def test_a_deployed_clients_personal_model_survives_a_restart(tmp_path) -> None:
    from fedguard.client.app import ClientApp
    from fedguard.client.state_store import DiskState

    model = _two_layer_model()
    w = model.get_flat().clone()
    settings = personal.PersonalSettings(personal.Method.DITTO, epochs=2, ditto_lambda=0.2)
    config = {"lr": 0.2, "batch_size": 4, "epochs": 1, "seed": 9, **settings.config()}
    data = {3: _data()}
    app = ClientApp(model, data, DiskState(tmp_path / "state"))
    app.handle(3, messages.encode(messages.FitTask(1, 3, w, config)))
    kept = app.state[3][personal.STATE]
    assert float((kept - w).abs().max()) > 1e-3
    evaluate = messages.encode(messages.EvaluateTask(1, 3, w, config))
    before = messages.decode(app.handle(3, evaluate), messages.EvaluateReply).metrics
    restarted = ClientApp(_two_layer_model(), data, DiskState(tmp_path / "state"))
    assert torch.equal(restarted.state[3][personal.STATE], kept)
    after = messages.decode(restarted.handle(3, evaluate), messages.EvaluateReply).metrics
    assert after == before and "personal_accuracy" in after


def test_a_client_without_held_out_data_of_its_own_answers_so_and_is_not_counted() -> None:
    """Client 0 holds only its share of the central split (too small to hold out a split of
    its own): it answers a personal evaluation task "no held-out data of its own" with nothing
    else, still evaluates the global model for the federated evaluation, and the server's
    personal evaluation counts client 1 alone."""
    from fedguard.client.app import ClientApp
    from fedguard.protocol import personal_eval
    from fedguard.simulation.inprocess import InProcessTransport

    model = _two_layer_model()
    w = model.get_flat().clone()
    own, share = _data(seed=1), _data(seed=2)
    data = {0: ClientData(own.train_x[:1], own.train_y[:1], share.eval_x, share.eval_y, False)}
    data[1] = _data()
    app = ClientApp(model, data, {})
    settings = personal.PersonalSettings(personal.Method.FINETUNE, epochs=1)
    config = {"lr": 0.2, "batch_size": 4, "epochs": 1, **settings.config()}
    task = messages.EvaluateTask(1, 0, w, {**config, "seed": 4})
    reply = messages.decode(app.handle(0, messages.encode(task)), messages.EvaluateReply)
    assert reply.num_examples == 0 and reply.metrics == {messages.NO_OWN_EVAL: 1.0}
    plain = messages.decode(
        app.handle(0, messages.encode(messages.EvaluateTask(1, 0, w, {}))), messages.EvaluateReply
    )
    assert plain.num_examples == 4 and set(plain.metrics) == {"loss", "accuracy"}
    scores = personal_eval.evaluate_personal(
        InProcessTransport(app.handle, [0, 1]), 1, w, [0, 1], config, seed=0
    )
    assert [s.client_id for s in scores] == [1]
    assert personal_eval.summarise(scores)["personal_clients"][0]["examples"] == 4


# Seed 9 with alpha 0.05 deals client 0 one training example: 30 % of it holds out none
TINY_CLIENT = {
    "experiment": {"seed": 9, "rounds": 2},
    "data": {
        "num_clients": 3,
        "alpha": 0.05,
        "synthetic_samples": 300,
        "client_eval_fraction": 0.3,
    },
    "server": {"clients_per_round": 3},
    "evaluation": {"mode": "federated"},
    "personalization": {"method": "ditto", "ditto_lambda": 0.3},
}


def test_the_cohort_engine_counts_the_same_clients_in_the_personal_evaluation(tmp_path) -> None:
    """A client too small to hold out a split of its own is left out of the personal
    evaluation by the in-process engine and the cohort engine alike (the client decides)."""
    runs = {}
    for kind in ("inprocess", "cohort"):
        cfg = tiny_config(**TINY_CLIENT, runtime={"kind": kind, "cohort_device": "cpu"})
        if kind == "inprocess":
            del cfg["runtime"]["cohort_device"]
        fedguard.run(cfg, out=tmp_path / kind, progress=False)
        runs[kind] = metric_rows(tmp_path / kind)
    sizes = json.loads((tmp_path / "inprocess" / "partition.json").read_text())["clients"]
    assert sizes[0]["num_samples"] == 1
    for a, b in zip(runs["inprocess"], runs["cohort"], strict=True):
        assert [c["client"] for c in a["personal_clients"]] == [1, 2]
        assert [c["client"] for c in b["personal_clients"]] == [1, 2]
        assert b["personal_accuracy_mean"] == pytest.approx(a["personal_accuracy_mean"], abs=1e-6)
        assert b["personal_accuracy_worst"] == pytest.approx(a["personal_accuracy_worst"], abs=1e-6)


def test_fedrep_trains_the_head_then_the_body_as_two_hand_written_sgd_steps() -> None:
    model = _two_layer_model()
    module = model.module
    w = model.get_flat().clone()
    settings = personal.PersonalSettings(personal.Method.FEDREP, epochs=1)
    lr = 0.4
    config = {"lr": lr, "batch_size": 64, "epochs": 1, **settings.config()}  # one step each
    data = _data()
    state: dict[str, torch.Tensor] = {}
    result = personal.PersonalizedTrainer(OptimizerTrainer()).train(
        model, data, _task(model, config, state)
    )
    names = [n for n, _ in module.named_parameters()]
    sizes = [p.numel() for _, p in module.named_parameters()]

    def grads(flat: torch.Tensor) -> torch.Tensor:
        p = flat.clone().requires_grad_(True)
        tensors = dict(zip(names, torch.split(p, sizes), strict=True))
        shaped = {n: t.view_as(dict(module.named_parameters())[n]) for n, t in tensors.items()}
        logits = torch.func.functional_call(module, shaped, (data.train_x,))
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, data.train_y), p)
        return g

    head = personal.head_mask(model, settings)
    after_head = torch.where(head, w - lr * grads(w), w)  # the head's step, the body frozen
    after_body = torch.where(head, after_head, after_head - lr * grads(after_head))
    torch.testing.assert_close(state[personal.STATE], after_body, rtol=1e-5, atol=1e-6)
    expected_update = torch.where(head, torch.zeros_like(w), after_body - w)
    torch.testing.assert_close(result.update, expected_update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ditto", "fedrep"])
def test_a_round_answered_twice_after_a_restart_trains_the_personal_model_once(
    tmp_path, method: str
) -> None:
    """A deployed client that restarts (or whose reply was lost) fetches its open task again:
    answering it a second time gives the same reply and leaves the same personal model as one
    answer, and its next round trains from that model, as a client that answered once does
    (the reference: a second client, same data, same tasks, each answered once)."""
    from fedguard.client.app import ClientApp
    from fedguard.client.state_store import DiskState

    settings = personal.PersonalSettings(personal.Method(method), epochs=3, ditto_lambda=0.4)
    config = {"lr": 0.15, "batch_size": 4, "epochs": 1, "seed": 7, **settings.config()}
    w = _two_layer_model().get_flat().clone()
    data = {5: _data(seed=3)}
    tasks = [messages.encode(messages.FitTask(r, 5, w + 0.01 * r, config)) for r in (1, 2)]

    once = ClientApp(_two_layer_model(), data, DiskState(tmp_path / "once"))
    replies_once = [once.handle(5, t) for t in tasks]

    twice = ClientApp(_two_layer_model(), data, DiskState(tmp_path / "twice"))
    first = twice.handle(5, tasks[0])
    after_first = twice.state[5][personal.STATE].clone()
    restarted = ClientApp(_two_layer_model(), data, DiskState(tmp_path / "twice"))
    again = restarted.handle(5, tasks[0])
    assert again == first == replies_once[0]
    assert torch.equal(restarted.state[5][personal.STATE], after_first)
    assert restarted.handle(5, tasks[1]) == replies_once[1]
    assert torch.equal(restarted.state[5][personal.STATE], once.state[5][personal.STATE])
    # the personal model did move in each round, so a second training would have shown
    assert float((after_first - once.state[5][personal.STATE]).abs().max()) > 1e-4
