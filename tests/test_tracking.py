"""[tracking]: every metrics row as TensorBoard scalars and in an MLflow run, read back with the
real libraries (TensorBoard's EventAccumulator; MlflowClient on a local file store)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import fedguard
from conftest import metric_rows, tiny_config
from fedguard.experiment import config as config_mod
from fedguard.experiment.config import ConfigError
from fedguard.observe import tracking


def test_tensorboard_and_mlflow_receive_every_row(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the file store is what a test can run without a server (MLflow asks to opt in to it)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny_config(
        experiment={"name": "tracked", "rounds": 2},
        tracking={"tensorboard": True, "mlflow": uri, "mlflow_experiment": "fedguard-tests"},
    )
    run = tmp_path / "run"
    fedguard.run(cfg, out=run, progress=False)
    rows = metric_rows(run)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("fedguard/test_accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["test_accuracy"] for r in rows])
    sent = [e.value for e in events.Scalars("fedguard/bytes_up")]
    assert sent == [r["bytes_up"] for r in rows]
    assert "fedguard/epsilon" not in events.Tags()["scalars"]  # null (no DP): not a number

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedguard-tests")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "tracked"
    assert found.data.params["server.strategy"] == "fedavg"
    assert found.data.params["experiment.rounds"] == "2"
    history = client.get_metric_history(found.info.run_id, "test_loss")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["test_loss"]) for r in rows]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "config.toml", "status.json", "plots"} <= artifacts
    assert "checkpoints" not in artifacts and "tensorboard" not in artifacts


@pytest.mark.parametrize(
    ("tracking_table", "message"),
    [
        ({"mlflow": "ftp://host/x"}, "tracking.mlflow: an MLflow tracking URI"),
        ({"mlflow": ""}, "tracking.mlflow: an MLflow tracking URI"),
        ({"tensorboard": "yes"}, "tracking.tensorboard"),
        ({"tensorboard_dir": " "}, "tracking.tensorboard_dir: must not be empty"),
        ({"wandb": True}, "tracking.wandb: unknown key"),
    ],
)
def test_bad_tracking_values_are_one_line_naming_the_key(tracking_table, message) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.validate(tiny_config(tracking=tracking_table))
    assert message in str(err.value)


def test_a_missing_tracking_package_is_a_config_error_before_round_1(tmp_path, monkeypatch) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"pip install 'fedguard\[mlflow\]'"):
        fedguard.run(
            tiny_config(tracking={"mlflow": "http://127.0.0.1:9"}),
            out=tmp_path / "r",
            progress=False,
        )
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


class _Broken:
    def log_row(self, row) -> None:
        raise ConnectionError("tracking server gone")

    def finish(self, run_dir, summary) -> None:
        raise AssertionError("a dropped sink is not called again")


class _Kept:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def log_row(self, row) -> None:
        self.rows.append(row["round"])

    def finish(self, run_dir, summary) -> None:
        self.rows.append(-1)


def test_a_failing_sink_is_switched_off_and_the_others_go_on(tmp_path, caplog) -> None:
    kept = _Kept()
    sinks = tracking.Sinks([_Broken(), kept])
    with caplog.at_level(logging.WARNING, logger="fedguard.tracking"):
        for r in (1, 2):
            sinks.log_row({"round": r, "test_accuracy": 0.5})
        sinks.finish(tmp_path, {"status": "completed"})
    assert kept.rows == [1, 2, -1]
    assert "tracking server gone" in caplog.text and "switched off" in caplog.text


def test_numeric_fields_leave_out_nulls_flags_and_non_finite() -> None:
    row = {"round": 3, "a": 1, "b": None, "c": float("nan"), "d": True, "e": "x", "f": 0.25}
    assert tracking.numeric_fields(row) == {"a": 1.0, "f": 0.25}
    assert tracking.flat_params({"s": {"k": 1, "t": {"u": "v"}}}) == {"s.k": "1", "s.t.u": "v"}
