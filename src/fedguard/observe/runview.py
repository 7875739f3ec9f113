"""Reading a run folder for the dashboard and the report, whatever state it is in.

A followed folder may be a run being written (a metrics line half written, no summary yet), a
finished run, a folder of an older version (no status.json), or not a run at all. Nothing here
raises on such input: :func:`read_run` returns what it could read and a list of ``problems``
in plain words, which the page shows beside the run. Only :func:`check_run_dir` refuses, for the
command line, a folder that holds none of a run's files.

:class:`RunReader` keeps the last parse of each file and reads a file again only when its size
or modification time changed, so a page that polls every second costs a ``stat`` per file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedguard.observe import status as status_file

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
PARTITION = "partition.json"
CONTRIBUTIONS = "contributions.json"
AUDIT = "audit/audit.json"
# A folder with at least one of these is a run folder (a run writes config.toml first).
RUN_MARKERS = (CONFIG, METRICS, status_file.FILE, SUMMARY)


class NotARunError(ValueError):
    """A folder that holds none of a run folder's files."""


def check_run_dir(path: Path) -> Path:
    """``path`` if it is a run folder (or one a starting run will fill: it exists and is
    empty); else :class:`NotARunError` saying what it is."""
    if not path.exists():
        raise NotARunError(f"{path}: no such folder")
    if not path.is_dir():
        raise NotARunError(f"{path}: not a folder (give the run folder `fedguard run` writes)")
    if any((path / name).exists() for name in RUN_MARKERS) or not any(path.iterdir()):
        return path
    raise NotARunError(
        f"{path}: not a run folder (it has none of {', '.join(RUN_MARKERS)}); give the folder "
        "`fedguard run --out` or `fedguard server --out` writes"
    )


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a metrics.jsonl text and the problems found.

    A last line without its newline is a row being written and is left for the next read; any
    other line that is not a JSON object with an integer ``round`` is skipped and named.
    """
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    lines = text.split("\n")
    complete, partial = lines[:-1], lines[-1]
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{METRICS} line {number} is not JSON; skipped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            problems.append(f"{METRICS} line {number} has no integer round; skipped")
            continue
        rows.append(status_file.json_safe(row))
    if partial.strip():
        try:  # a file written without a final newline is still read
            row = json.loads(partial)
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rows.append(status_file.json_safe(row))
        except json.JSONDecodeError:
            pass  # being written
    return rows, problems


def _json_object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return status_file.json_safe(data)


@dataclass
class _Cached:
    stamp: tuple[int, int]
    value: Any
    problems: list[str] = field(default_factory=list)


class RunReader:
    """Reads run folders, parsing a file again only when it changed."""

    def __init__(self) -> None:
        self._cache: dict[Path, _Cached] = {}

    def _file(
        self, path: Path, parse: Callable[[str], tuple[Any, list[str]]]
    ) -> tuple[Any, list[str]]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None, []
        except OSError as exc:
            return None, [f"{path.name} cannot be read ({exc.strerror or exc})"]
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached.value, cached.problems
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            value, problems = parse(text)
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            value, problems = None, [f"{path.name} cannot be read ({exc})"]
        self._cache[path] = _Cached(stamp, value, problems)
        return value, problems

    def _object(self, path: Path) -> tuple[dict[str, Any] | None, list[str]]:
        return self._file(path, lambda t: (_json_object(t), []))

    def read(self, root: Path) -> dict[str, Any]:
        """Everything the page and the report show of the run at ``root`` (see module doc)."""
        root = Path(root)
        problems: list[str] = []
        if not root.is_dir():
            return {
                "path": str(root),
                "name": root.name,
                "is_run": False,
                "problems": [f"{root}: no such folder (yet)"],
                "metrics": [],
            }
        metrics, found = self._file(root / METRICS, parse_metrics)
        problems += found
        out: dict[str, Any] = {"path": str(root), "metrics": metrics or []}
        for key, file_name in (
            ("status", status_file.FILE),
            ("summary", SUMMARY),
            ("partition", PARTITION),
            ("contributions", CONTRIBUTIONS),
            ("audit", AUDIT),
        ):
            value, found = self._object(root / file_name)
            out[key] = value
            problems += found
        config, found = self._file(root / CONFIG, lambda t: (tomllib.loads(t), []))
        out["config"] = status_file.json_safe(config) if config is not None else None
        problems += found
        out["is_run"] = any((root / name).exists() for name in RUN_MARKERS)
        if not out["is_run"]:
            problems.append(f"{root}: no run has written here yet ({', '.join(RUN_MARKERS)})")
        name = None
        for source in (out["status"], out["summary"]):
            if isinstance(source, dict) and isinstance(source.get("name"), str):
                name = source["name"]
                break
        out["name"] = name or root.name
        out["problems"] = problems
        return out
