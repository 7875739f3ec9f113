"""User code named in a config as ``"package.module:callable"``: import it and call it.

Models and data sets are functions; strategies, aggregators, client trainers and attacks are
objects of fedguard's public protocols (``fedguard.Strategy``, ``fedguard.Aggregator``,
``fedguard.ClientTrainer``, ``fedguard.Attack``), made by calling the named class or function with
the options table of its key (``server.aggregator_options``, ...) and, if it asks for it, a
:class:`fedguard.PluginContext` (:mod:`fedguard.experiment.plugin_context`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any


class PluginError(ValueError):
    """A ``package.module:callable`` reference that cannot be imported or called."""


def import_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """Import ``package.module:callable``; ``what`` names the config key in errors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f'{what} {spec!r} must have the form "package.module:callable".')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}).") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PluginError(f"{what} {spec!r}: {module_name!r} has no callable named {attr!r}.")
    return fn


def call_with_supported(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with those of ``kwargs`` that it declares (all of them if it takes ``**kw``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def is_reference(name: str) -> bool:
    """Whether a configured name is a ``package.module:name`` reference (not a built-in name)."""
    return ":" in name


def load(spec: str, *, what: str, options: Mapping[str, Any], context: Any) -> object:
    """Import ``package.module:name`` and call it with ``options`` as keyword arguments (and
    ``context=context`` if it declares ``context`` or takes ``**kwargs``); the caller checks what
    it made with :func:`check_kind`. ``what`` names the config key in errors."""
    factory = import_callable(spec, what=what)
    if "context" in options:
        raise PluginError(f'{what} {spec!r}: "context" is reserved; rename that option.')
    arguments = dict(options)
    try:
        params = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no signature to read: options only
        params = {}
    if "context" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        arguments["context"] = context
    try:
        return factory(**arguments)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{what} {spec!r}: {exc}") from exc


def check_kind(made: object, kind: type, *, spec: str, what: str) -> None:
    """Refuse ``made`` unless it is a ``kind`` (one of fedguard's public protocols)."""
    if not isinstance(made, kind):
        raise PluginError(
            f"{what} {spec!r} gave a {type(made).__name__}, not a fedguard.{kind.__name__} "
            "(subclass it)."
        )
