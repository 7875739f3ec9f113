"""Federated evaluation: the AUC from score histograms, the weight cap at the registered
held-out count, the server's own test set, and clients that hold no held-out data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fedguard
from conftest import metric_rows, tiny_config
from fedguard.algorithms import binned_auc
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.experiment import config as config_mod
from fedguard.experiment import runner
from fedguard.experiment.assembly import Experiment
from fedguard.experiment.config import ConfigError
from fedguard.experiment.data_free import DataFreeExperiment
from fedguard.protocol import messages
from fedguard.protocol.transport import Transport
from fedguard.simulation.inprocess import InProcessTransport


def test_the_binned_auc_by_hand() -> None:
    # positives score in bins 2 and 3, negatives in bins 0 and 2: pairs (2, 0) 1, (2, 2) 1/2,
    # (3, 0) 1, (3, 2) 1, so AUC = 3.5 / 4
    positive = torch.tensor([0, 0, 1, 1])
    negative = torch.tensor([1, 0, 1, 0])
    assert binned_auc.auc_of_class(positive, negative) == 0.875
    assert binned_auc.auc_of_class(positive, torch.zeros(4)) is None
    p = torch.tensor([[0.9, 0.1], [0.35, 0.65], [0.2, 0.8], [0.6, 0.4]])
    y = torch.tensor([0, 1, 1, 0])
    h = binned_auc.score_histograms(p, y, 4)
    assert h[1, 0].tolist() == [0, 0, 1, 1] and h[1, 1].tolist() == [1, 1, 0, 0]
    assert binned_auc.auc(h) == 1.0


@pytest.mark.parametrize("classes", [2, 5])
def test_the_binned_auc_of_split_data_is_the_pooled_auc_within_1e_3(classes) -> None:
    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 3000)
    logits = rng.normal(size=(3000, classes)) + 1.5 * np.eye(classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    exact = roc_auc_score(y, p[:, 1]) if classes == 2 else roc_auc_score(y, p, multi_class="ovr")
    parts = np.array_split(np.arange(3000), 7)  # seven clients' histograms, added up
    total = sum(
        binned_auc.score_histograms(torch.from_numpy(p[i]), torch.from_numpy(y[i]), 1000)
        for i in parts
    )
    assert isinstance(total, torch.Tensor)
    got = binned_auc.auc(total)
    assert got is not None and abs(got - exact) < 1e-3 and 0.7 < exact < 0.95


def _harder() -> dict:
    """Ten IID clients, one round of slow SGD: a model that is right about 80% of the time."""
    return tiny_config(
        experiment={"rounds": 2},
        data={"synthetic_samples": 3000, "num_clients": 10, "partition": "iid"},
        client={"lr": 0.002},
        server={"clients_per_round": 10},
    )


def test_simulated_federated_evaluation_equals_the_central_one(tmp_path) -> None:
    central = fedguard.run(_harder(), out=tmp_path / "c", progress=False)
    fed = fedguard.run(
        _harder(), out=tmp_path / "f", progress=False, overrides=["evaluation.mode=federated"]
    )
    both = fedguard.run(
        _harder(), out=tmp_path / "b", progress=False, overrides=["evaluation.mode=both"]
    )
    assert 0.6 < central["test_accuracy"] < 0.95
    assert fed["test_accuracy"] == central["test_accuracy"] == both["test_accuracy"]
    assert fed["test_loss"] == pytest.approx(central["test_loss"], rel=1e-6)
    assert fed["test_auc"] == pytest.approx(central["test_auc"], abs=2e-3)
    assert fed["confusion_matrix"] == central["confusion_matrix"]
    last = metric_rows(tmp_path / "b")[-1]
    assert last["federated_accuracy"] == last["test_accuracy"]
    assert last["federated_auc"] == pytest.approx(last["test_auc"], abs=2e-3)


def _data_free(cfg: dict, handle) -> DataFreeExperiment:
    def transport_fn(ids: list[int]) -> Transport:
        return InProcessTransport(handle, ids)

    return DataFreeExperiment(config_mod.validate(cfg), transport_fn=transport_fn)


def test_an_evaluation_reply_weighs_at_most_its_registered_held_out_count() -> None:
    cfg = _harder()
    clients = Experiment(config_mod.validate(cfg))
    honest = _data_free(cfg, clients.app.handle)
    params = clients.initial_params + 0.01

    def inflated(cid: int, payload: bytes) -> bytes:
        reply = clients.app.handle(cid, payload)
        if cid != 0 or messages.kind_of(payload) != "EvaluateTask":
            return reply
        r = messages.decode(reply, messages.EvaluateReply)
        tensors = {k: v * 50 for k, v in r.tensors.items()}  # claims 50 times its examples
        return messages.encode(
            messages.EvaluateReply(r.round, 0, r.num_examples * 50, r.metrics, tensors)
        )

    liar = _data_free(cfg, inflated)
    a = honest.evaluate_round(1, params)
    b = liar.evaluate_round(1, params)
    assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-12)
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-12)
    # without the cap, client 0 would count 50 times
    uncapped = liar.driver.evaluate_round(1, params, clients=list(liar.eval_clients), num_classes=3)
    assert uncapped is not None and uncapped.examples == 60 * 50 + 9 * 60


def test_a_server_owned_test_set(tmp_path) -> None:
    cfg = _harder()
    clients = Experiment(config_mod.validate(cfg))
    path = tmp_path / "server-test.npz"
    np.savez(path, x=clients.fed.eval_x.numpy(), y=clients.fed.eval_y.numpy())
    owned = {**cfg, "evaluation": {"server_data": str(path)}}  # mode: "server", as it has one
    exp = _data_free(owned, clients.app.handle)
    assert exp.mode == "server"
    params = clients.initial_params + 0.01
    assert exp.evaluate_round(1, params) == {
        **clients.evaluate(params),
        "backdoor_success": None,
    }
    both = _data_free(
        {**owned, "evaluation": {"server_data": str(path), "mode": "both"}}, clients.app.handle
    )
    row = both.evaluate_round(1, params)
    assert row["federated_accuracy"] == row["test_accuracy"]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(
        ConfigError, match=r"server_data: examples of shape \[5\], the model takes \[1, 6, 6\]"
    ):
        _data_free({**cfg, "evaluation": {"server_data": str(wrong)}}, clients.app.handle)


def test_only_clients_with_held_out_data_evaluate(tmp_path) -> None:
    cfg = tiny_config()
    clients = Experiment(config_mod.validate(cfg))
    # clients 0-2 keep no held-out data: they register 0 and are never asked
    data = {
        cid: d if cid > 2 else ClientData(d.train_x, d.train_y)
        for cid, d in clients.fed.clients.items()
    }
    app = ClientApp(clients.model, data, pins=clients.app.pins)
    asked: list[int] = []

    def handle(cid: int, payload: bytes) -> bytes:
        if messages.kind_of(payload) == "EvaluateTask":
            asked.append(cid)
        return app.handle(cid, payload)

    def transport_fn(ids: list[int]) -> Transport:
        return InProcessTransport(handle, ids)

    summary = runner.run(
        cfg, out=tmp_path / "r", progress=False, transport_fn=transport_fn, data_free=True
    )
    assert sorted(set(asked)) == [3, 4, 5] and len(asked) == 3 * 3
    assert sum(map(sum, summary["confusion_matrix"])) == 60  # three shares of 20
    with pytest.raises(ValueError, match="holds no held-out data"):
        app.evaluate(messages.EvaluateTask(1, 0, clients.initial_params))
    nobody = ClientApp(
        clients.model, {c: ClientData(d.train_x, d.train_y) for c, d in data.items()}
    )
    with pytest.raises(ConfigError, match="no admitted client holds held-out data"):
        _data_free(cfg, nobody.handle)
