"""Tracking sinks: every metrics row also as TensorBoard scalars, or in an MLflow run.

``[tracking] tensorboard = true`` writes each numeric field of each metrics.jsonl row as the
TensorBoard scalar ``fedguard/<field>`` at step ``round`` (``torch.utils.tensorboard``, which
needs the ``tensorboard`` package: ``pip install 'fedguard[tensorboard]'``).
``[tracking] mlflow = "URI"`` opens an MLflow run at that tracking URI, logs the resolved
configuration as parameters, each row as metrics at step ``round``, and at the end the run
folder's files (summary, metrics, plots, ...; never the checkpoints) as artefacts
(``pip install 'fedguard[mlflow]'``, the ``mlflow-skinny`` client).

A sink that fails while the run goes on (a tracking server that went away) is logged once and
switched off: tracking never stops a federated run. A missing package is a configuration error
before round 1.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("fedguard.tracking")

TENSORBOARD_DIR = "tensorboard"
SCALAR_PREFIX = "fedguard/"
# Run-folder entries not sent to MLflow: the model and server state are not results.
NOT_ARTIFACTS = ("checkpoints", TENSORBOARD_DIR)


class TrackingError(ValueError):
    """A tracking setting that cannot work (a missing package); raised before round 1."""


class TrackingSettings(Protocol):
    """What the sinks read of the config's ``[tracking]`` table."""

    @property
    def tensorboard(self) -> bool: ...

    @property
    def tensorboard_dir(self) -> str | None: ...

    @property
    def mlflow(self) -> str | None: ...

    @property
    def mlflow_experiment(self) -> str | None: ...


class Sink(Protocol):
    """Receives a run's rows as they are written."""

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None: ...


def numeric_fields(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's finite numbers (booleans and ``round`` left out), by field name."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"server.strategy": "fedavg", ...}``: the configuration's leaves as MLflow parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


def _require(module: str, extra: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TrackingError(
            f"tracking.{key} needs the {module} package, which is not installed: "
            f"pip install 'fedguard[{extra}]'"
        )


class TensorBoardSink:
    """Scalars in an event file under ``log_dir`` (read back with TensorBoard's
    ``EventAccumulator``, or ``tensorboard --logdir``)."""

    def __init__(self, log_dir: Path) -> None:
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log_row(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for key, value in numeric_fields(row).items():
            self._writer.add_scalar(SCALAR_PREFIX + key, value, global_step=step)
        self._writer.flush()

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        self._writer.close()


class MlflowSink:
    """One MLflow run per fedguard run (or per resumed part of it), through ``MlflowClient``
    (no global active run)."""

    def __init__(self, uri: str, experiment: str, run_name: str, config: Mapping[str, Any]) -> None:
        _require("mlflow", "mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None else self._client.create_experiment(experiment)
        )
        self.run_id: str = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        params = flat_params(config)
        from mlflow.entities import Param

        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            batch = [Param(k, v) for k, v in items[start : start + 100]]
            self._client.log_batch(self.run_id, params=batch)

    def log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(row["round"])
        stamp = _millis()
        metrics = [Metric(k, v, stamp, step) for k, v in numeric_fields(row).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        for entry in sorted(run_dir.iterdir()):
            if entry.name in NOT_ARTIFACTS or entry.name.startswith("."):
                continue
            if entry.is_dir():
                self._client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
            elif entry.is_file() and not entry.name.endswith(".tmp"):
                self._client.log_artifact(self.run_id, str(entry))
        ok = summary.get("status") in ("completed", "budget_spent")
        self._client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class Sinks:
    """The run's sinks; a sink that raises is logged and dropped, the run goes on."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._each("log_row", lambda s: s.log_row(row))

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        self._each("finish", lambda s: s.finish(run_dir, summary))

    def _each(self, what: str, call: Any) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # tracking must never stop the federated run
                log.warning(
                    "tracking: %s failed in %s (%s); it is switched off for this run",
                    type(sink).__name__,
                    what,
                    exc,
                )
                self.sinks.remove(sink)


def open_sinks(
    settings: TrackingSettings, run_dir: Path, name: str, config: Mapping[str, Any]
) -> Sinks:
    """The sinks ``settings`` (the config's ``[tracking]`` table) asks for; raises
    :class:`TrackingError` when a needed package is missing, before anything is written."""
    sinks: list[Sink] = []
    if settings.tensorboard:
        _require("tensorboard", "tensorboard", "tensorboard")
    if settings.mlflow is not None:
        _require("mlflow", "mlflow", "mlflow")
    if settings.tensorboard:
        log_dir = (
            Path(settings.tensorboard_dir)
            if settings.tensorboard_dir
            else run_dir / TENSORBOARD_DIR
        )
        sinks.append(TensorBoardSink(log_dir))
    if settings.mlflow is not None:
        try:
            sinks.append(
                MlflowSink(settings.mlflow, settings.mlflow_experiment or name, name, config)
            )
        except Exception as exc:  # the client's own errors: unreachable server, refused store
            raise TrackingError(
                f"tracking.mlflow {settings.mlflow!r}: cannot open an MLflow run ({exc})"
            ) from None
    return Sinks(sinks)
