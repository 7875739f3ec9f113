"""Model construction from a config: built-in names or a user's ``package.module:callable``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedguard import plugins
from fedguard.models import torch_models
from fedguard.models.adapter import ModelAdapter, TorchModel


class ModelError(ValueError):
    """A model name or builder that cannot produce a usable model."""


def adapt(model: Any, *, input_shape: tuple[int, ...]) -> ModelAdapter:
    """Wrap a ``torch.nn.Module`` or a Keras 3 model in its adapter."""
    if isinstance(model, ModelAdapter):
        return model
    if _is_keras(model):
        from fedguard.models.keras_adapter import KerasModel

        return KerasModel(model, input_shape=input_shape)
    if isinstance(model, torch.nn.Module):
        torch_models.check_dtype(model)
        return TorchModel(model)
    raise ModelError(
        f"A model builder returned {type(model).__name__}; expected a torch.nn.Module or a "
        "keras.Model."
    )


def _is_keras(model: Any) -> bool:
    return any(c.__module__.startswith("keras") for c in type(model).__mro__)


def build(
    name: str,
    *,
    framework: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    builder: Callable[..., Any] | None = None,
) -> ModelAdapter:
    """Build the model named ``name`` (or by ``builder``) with a seeded initialisation."""
    torch.manual_seed(seed)
    if builder is None and ":" in name:
        builder = plugins.import_callable(name, what="model.name")
    if framework == "keras":
        import keras

        from fedguard.models import (
            keras_adapter,  # noqa: F401 - selects the torch backend first
            keras_models,
        )

        keras.utils.set_random_seed(seed)
        if builder is None:
            if name not in keras_models.BUILTIN:
                raise ModelError(_unknown(name, keras_models.BUILTIN))
            builder = keras_models.BUILTIN[name]
        model = plugins.call_with_supported(
            builder, input_shape=input_shape, num_classes=num_classes
        )
        if not _is_keras(model):
            raise ModelError(
                f'model.framework is "keras" but the builder returned {type(model).__name__}; '
                'set model.framework = "torch" for PyTorch modules.'
            )
        return adapt(model, input_shape=input_shape)
    if builder is None:
        if name not in torch_models.BUILTIN:
            raise ModelError(_unknown(name, torch_models.BUILTIN))
        builder = torch_models.BUILTIN[name]
    model = plugins.call_with_supported(builder, input_shape=input_shape, num_classes=num_classes)
    if _is_keras(model):
        raise ModelError(
            'model.framework is "torch" but the builder returned a Keras model; '
            'set model.framework = "keras".'
        )
    return adapt(model, input_shape=input_shape)


def _unknown(name: str, builtin: dict[str, Any]) -> str:
    return (
        f"model.name: unknown model {name!r}; built-in models are {', '.join(sorted(builtin))}, "
        'or give "package.module:callable".'
    )
