"""End-to-end runs: the run folder contract, determinism, resume and Ctrl-C."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fedguard
from conftest import tiny_config
from fedguard.experiment import runner


def _rows(folder) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def _final_params(folder) -> torch.Tensor:
    last = sorted((folder / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "tensors.safetensors"))["params"]


@pytest.mark.plots  # its pictures are drawn (conftest)
def test_run_folder_contract(tmp_path) -> None:
    summary = fedguard.run(tiny_config(), out=tmp_path / "r", progress=False)
    folder = tmp_path / "r"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "partition.json"):
        assert (folder / name).exists(), name
    for plot in ("accuracy.png", "loss.png", "partition.png", "confusion_matrix.png"):
        assert (folder / "plots" / plot).stat().st_size > 1000
    rows = _rows(folder)
    assert [r["round"] for r in rows] == [1, 2, 3]
    required = {
        "test_accuracy",
        "test_loss",
        "train_loss",
        "clients_sampled",
        "clients_completed",
        "epsilon",
        "bytes_up",
        "bytes_down",
    }
    assert required <= set(rows[0])
    assert all(r["clients_sampled"] == 4 and r["clients_completed"] == 4 for r in rows)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    matrix = summary["confusion_matrix"]
    test_size = json.loads((folder / "partition.json").read_text())["eval_samples"]
    assert sum(map(sum, matrix)) == test_size
    assert abs(sum(matrix[i][i] for i in range(3)) / test_size - summary["test_accuracy"]) < 1e-12
    part = json.loads((folder / "partition.json").read_text())
    assert part["total_samples"] == sum(c["num_samples"] for c in part["clients"])
    assert len(part["clients"]) == 6
    # logistic regression on 6x6x1 inputs with 3 classes: 36*3 + 3 values travel per update
    assert summary["num_parameters"] == 111
    assert len(list((folder / "checkpoints").glob("round_*"))) == 2  # keep = 2


def test_same_seed_same_metrics(tmp_path) -> None:
    cfg = tiny_config(client={"optimizer": "adam", "lr": 0.01})
    fedguard.run(cfg, out=tmp_path / "a", progress=False)
    fedguard.run(cfg, out=tmp_path / "b", progress=False)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    other = tiny_config(experiment={"seed": 4}, client={"optimizer": "adam", "lr": 0.01})
    fedguard.run(other, out=tmp_path / "c", progress=False)
    assert _rows(tmp_path / "a") != _rows(tmp_path / "c")


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
def test_resume_equals_uninterrupted(tmp_path, strategy) -> None:
    cfg = tiny_config(experiment={"rounds": 5}, server={"strategy": strategy})
    fedguard.run(cfg, out=tmp_path / "full", progress=False)
    short = tiny_config(experiment={"rounds": 2}, server={"strategy": strategy})
    fedguard.run(short, out=tmp_path / "part", progress=False)
    fedguard.run(cfg, out=tmp_path / "part", resume=True, progress=False)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part")
    assert torch.equal(_final_params(tmp_path / "full"), _final_params(tmp_path / "part"))


def test_ctrl_c_saves_finished_rounds_and_resume_continues(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(experiment={"rounds": 4})
    fedguard.run(cfg, out=tmp_path / "full", progress=False)
    real = runner._one_round

    def interrupt_in_round_3(exp, round_, params, state):
        if round_ == 3:
            raise KeyboardInterrupt
        return real(exp, round_, params, state)

    monkeypatch.setattr(runner, "_one_round", interrupt_in_round_3)
    with pytest.raises(runner.RunInterrupted, match="after round 2"):
        fedguard.run(cfg, out=tmp_path / "cut", progress=False)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == 2
    monkeypatch.setattr(runner, "_one_round", real)
    fedguard.run(cfg, out=tmp_path / "cut", resume=True, progress=False)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "cut")


def test_resume_with_changed_config_is_refused(tmp_path) -> None:
    fedguard.run(tiny_config(), out=tmp_path / "r", progress=False)
    with pytest.raises(runner.ConfigError, match="client.lr"):
        fedguard.run(
            tiny_config(client={"lr": 0.5}), out=tmp_path / "r", resume=True, progress=False
        )


def test_user_model_and_data_functions(tmp_path) -> None:
    import numpy as np

    from fedguard.data.dataset import ArrayDataset, FederatedDataset

    def my_data() -> FederatedDataset:
        rng = np.random.default_rng(0)

        def blob(n, shift):
            x = rng.normal(size=(n, 4)).astype(np.float32)
            y = (x[:, 0] + shift > 0).astype(np.int64)
            return ArrayDataset(x, y)

        test = blob(100, 0.0)
        test = ArrayDataset(test.x, test.y, np.array(["north"] * 40 + ["south"] * 60))
        return FederatedDataset({"a": blob(50, 0.5), "b": blob(80, -0.5)}, test, 2)

    def my_model(input_shape, num_classes):
        return torch.nn.Sequential(
            torch.nn.Linear(input_shape[0], 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes)
        )

    cfg = tiny_config(
        data={"num_clients": 2},
        server={"clients_per_round": 2},
        experiment={"rounds": 8},
        client={"lr": 0.2, "epochs": 2},
    )
    summary = fedguard.run(
        cfg, out=tmp_path / "u", model_fn=my_model, data_fn=my_data, progress=False
    )
    assert summary["num_parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert summary["test_accuracy"] > 0.85
    by_group = summary["accuracy_by_group"]
    assert set(by_group) == {"north", "south"}
    assert abs(0.4 * by_group["north"] + 0.6 * by_group["south"] - summary["test_accuracy"]) < 1e-9


def test_keras_model_runs_the_same_pipeline(tmp_path) -> None:
    cfg = tiny_config(
        model={"framework": "keras"},
        experiment={"rounds": 4},
        server={"strategy": "fedadam", "server_lr": 0.05},
    )
    summary = fedguard.run(cfg, out=tmp_path / "k", progress=False)
    torch_summary = fedguard.run(
        tiny_config(experiment={"rounds": 4}, server={"strategy": "fedadam", "server_lr": 0.05}),
        out=tmp_path / "t",
        progress=False,
    )
    assert summary["num_parameters"] == torch_summary["num_parameters"] == 111
    # the synthetic classes are well separated: both frameworks learn them in four rounds
    assert summary["test_accuracy"] > 0.9 and torch_summary["test_accuracy"] > 0.9


def test_federated_evaluation_is_the_example_weighted_mean(tmp_path) -> None:
    cfg = tiny_config(evaluation={"mode": "both"}, data={"client_eval_fraction": 0.2})
    fedguard.run(cfg, out=tmp_path / "f", progress=False)
    rows = _rows(tmp_path / "f")
    assert all(0.0 <= r["federated_accuracy"] <= 1.0 for r in rows)
    from fedguard.experiment import config as config_mod
    from fedguard.experiment.assembly import Experiment

    exp = Experiment(config_mod.validate(cfg))
    params = _final_params(tmp_path / "f")
    exp.model.set_flat(params)
    from fedguard.client import evaluation

    total = correct = 0
    for data in exp.fed.clients.values():
        r = evaluation.evaluate(exp.model, data.eval_x, data.eval_y)
        total += r.num_examples
        correct += round(r.accuracy * r.num_examples)
    assert abs(rows[-1]["federated_accuracy"] - correct / total) < 1e-9


def test_keras_after_torch_in_one_process_uses_the_torch_backend(tmp_path) -> None:
    """A user's keras.json naming another backend must not break a Keras run after a torch run."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text('{"backend": "tensorflow"}')
    script = (
        "import fedguard\n"
        "cfg = {'experiment': {'rounds': 1}, 'data': {'num_clients': 2, 'synthetic_samples': 60,"
        " 'synthetic_shape': [4]}, 'model': {'name': 'logistic_regression'}}\n"
        f"fedguard.run(cfg, out={str(tmp_path / 'a')!r}, progress=False)\n"
        "cfg['model']['framework'] = 'keras'\n"
        f"print(fedguard.run(cfg, out={str(tmp_path / 'b')!r}, progress=False)['status'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | {"HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("completed")


class _ThreadsSeen(torch.nn.Module):
    """A linear model that records torch's intra-op threads at each forward pass."""

    seen: list[int] = []

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ThreadsSeen.seen.append(torch.get_num_threads())
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("threads", [1, 3])
def test_runtime_threads_hold_for_the_run_and_are_restored_after(tmp_path, threads):
    before = torch.get_num_threads()
    other = 5 if threads != 5 else 4
    torch.set_num_threads(other)
    _ThreadsSeen.seen = []
    try:
        fedguard.run(
            tiny_config(experiment={"rounds": 2}, runtime={"threads": threads}),
            out=tmp_path / "run",
            progress=False,
            model_fn=lambda input_shape, num_classes: _ThreadsSeen(
                int(torch.tensor(input_shape).prod()), num_classes
            ),
        )
        assert _ThreadsSeen.seen and set(_ThreadsSeen.seen) == {threads}
        assert torch.get_num_threads() == other  # the caller's setting is back
    finally:
        torch.set_num_threads(before)


def test_runtime_threads_must_be_positive():
    from fedguard.experiment import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="runtime.threads"):
        config_mod.validate(tiny_config(runtime={"threads": 0}))
