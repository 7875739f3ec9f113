"""The run folder: the files every entry point writes (see ARCHITECTURE.md).

Besides those, a run keeps ``status.json`` (where it is now: the round in progress and its
clients, the time left; :mod:`fedguard.observe.status`) for the live dashboard, and with
``[tracking] tensorboard = true`` a ``tensorboard/`` folder of event files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tomli_w


class RunFolder:
    """Paths and writers of one run's folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def partition(self) -> Path:
        return self.root / "partition.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(exist_ok=True)

    def write_json(self, path: Path, data: Any) -> None:
        """Write JSON atomically (temporary file, then rename)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)

    def write_config(self, data: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".toml.tmp")
        tmp.write_text(tomli_w.dumps(data))
        os.replace(tmp, self.config)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the readable history
        return rows

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
