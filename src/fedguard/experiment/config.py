"""Experiment configuration: TOML files validated with pydantic, with one-line errors.

Every key has a type and a range; unknown keys are refused, so a typo never silently falls back to
a default. Cross-key rules (more clients per round than clients, FedProx without a proximal term,
Krum under secure aggregation, more Byzantine clients than a robust rule tolerates) are checked
before anything runs, by :mod:`fedguard.experiment.config_checks`. A strategy, aggregator, client
trainer or attack may be a plug-in named ``"package.module:name"``, with its options as a table
(``server.aggregator_options = { ... }``); the run checks it by the same rules once built.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from fedguard.experiment import config_checks
from fedguard.experiment.config_sections import (
    BUILTIN_AGGREGATORS,
    BUILTIN_ATTACKS,
    DP_COUNT_BUCKET,
    AttackSection,
    AuditSection,
    CheckpointSection,
    ClientSection,
    ConfigError,
    ContributionSection,
    DataSection,
    EvaluationSection,
    ExperimentSection,
    ExperimentSections,
    LatencySection,
    ModelSection,
    Options,
    PersonalizationSection,
    PrivacySection,
    Probability,
    RegistrationSection,
    RuntimeSection,
    SecureAggregationSection,
    ServerSection,
)

__all__ = [
    "ConfigError",
    "ExperimentSection",
    "DataSection",
    "ModelSection",
    "PersonalizationSection",
    "ClientSection",
    "ServerSection",
    "AttackSection",
    "AuditSection",
    "EvaluationSection",
    "RegistrationSection",
    "PrivacySection",
    "SecureAggregationSection",
    "CheckpointSection",
    "ContributionSection",
    "LatencySection",
    "RuntimeSection",
    "Probability",
    "Options",
    "BUILTIN_AGGREGATORS",
    "BUILTIN_ATTACKS",
    "DP_COUNT_BUCKET",
    "ExperimentSections",
    "ExperimentConfig",
    "apply_overrides",
    "load",
    "parse_override",
    "to_toml_dict",
    "validate",
]


class ExperimentConfig(ExperimentSections):
    """The whole experiment; sections mirror the TOML tables. Validation also checks the rules
    that tie sections together (:mod:`fedguard.experiment.config_checks`)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        config_checks.plugin_options(self)
        config_checks.strategy_and_optimizer(self)
        config_checks.personalization(self)
        config_checks.privacy(self)
        config_checks.secure_aggregation(self)
        config_checks.robustness(self)
        config_checks.builtin_composition(self)
        config_checks.contribution(self)
        config_checks.runtime(self)
        config_checks.asynchronous(self)
        config_checks.audit(self)
        return self


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{key}: unknown key{hint}"
    message = error["msg"]
    if error["type"] == "value_error":
        return message.removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return f"{key}: {message}{shown}"


def validate(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a configuration mapping; raise :class:`ConfigError` with one line per problem."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as TOML (``0.1``, ``true``, ``"sgd"``) or text."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.path=value`` override set."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return out


def load(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a TOML experiment file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return validate(apply_overrides(data, overrides or []))


def to_toml_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain TOML-writable tables (no null values)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, tuple):
            return list(value)
        return value

    return clean(config.model_dump(mode="python"))
