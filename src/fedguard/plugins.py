"""User code named in a config as ``"package.module:callable"``: import it and call it."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
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
