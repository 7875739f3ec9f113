"""The adapter for Keras 3 models, which fedguard runs on the torch backend.

With ``KERAS_BACKEND=torch`` every Keras layer is a ``torch.nn.Module`` and the value of each
``keras.Variable`` is a ``torch.nn.Parameter``; a call ``model(x, training=True)`` on torch tensors
runs eagerly under autograd. So the shared training loops train a Keras model with torch
optimizers over those parameters, and ``set_flat`` writes into them in place, which Keras sees
(``model.get_weights()`` reads the same storage).

Importing this module sets ``KERAS_BACKEND=torch`` unless the variable is already set, and refuses
any other backend.
"""

from __future__ import annotations

import os

import torch

from fedguard.models.adapter import ModelAdapter, TrainableSlice
from fedguard.models.paramspec import ParamSpec

_WRONG_BACKEND = (
    "fedguard runs Keras 3 on the torch backend, but Keras is using {backend!r}: set "
    "KERAS_BACKEND=torch before Keras is first imported."
)

os.environ.setdefault("KERAS_BACKEND", "torch")
try:
    import keras
except ImportError as err:  # e.g. KERAS_BACKEND=tensorflow without TensorFlow installed
    if os.environ["KERAS_BACKEND"] == "torch":
        raise
    raise ImportError(_WRONG_BACKEND.format(backend=os.environ["KERAS_BACKEND"])) from err

if keras.backend.backend() != "torch":
    raise ImportError(_WRONG_BACKEND.format(backend=keras.backend.backend()))


def _output_layer(model: keras.Model) -> keras.Layer | None:
    """The layer that produces the model's (first) output, looking inside nested models."""
    outputs = getattr(model, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if outputs else None
    layer = history.operation if history is not None else None
    if layer is None and model.layers:
        layer = model.layers[-1]
    if isinstance(layer, keras.Model) and layer is not model:
        return _output_layer(layer)
    return layer


def ends_in_softmax(model: keras.Model) -> bool:
    """True when the output layer is ``keras.layers.Softmax`` or has a softmax activation."""
    layer = _output_layer(model)
    if isinstance(layer, keras.layers.Softmax):
        return True
    return getattr(layer, "activation", None) is keras.activations.softmax


class KerasModel(ModelAdapter):
    """Adapter for a Keras 3 model (torch backend) that returns class probabilities or logits.

    The state is every variable in ``model.weights``, trainable or not (batch-norm moving
    statistics travel too), in that order and named by ``variable.path``. An unbuilt model is
    built by calling it on a zero batch of ``input_shape`` (one example's shape, no batch axis).
    ``outputs_probabilities`` defaults to whether the output layer ends in a softmax; pass it
    for models where that cannot be read off the last layer (e.g. subclassed models).
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        input_shape: tuple[int, ...] | None = None,
        outputs_probabilities: bool | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"KerasModel needs a keras.Model, got {type(model).__name__}.")
        if not model.built:
            if input_shape is None:
                raise ValueError(
                    "The Keras model is not built: pass input_shape (one example, no batch axis)."
                )
            model(torch.zeros((1, *input_shape)), training=False)
        variables = list(model.weights)
        if not variables:
            raise ValueError("The Keras model has no weights to train or send.")
        names = [v.path for v in variables]
        if len(set(names)) != len(names):
            raise ValueError("The Keras model has two variables with the same path.")
        params: list[torch.nn.Parameter] = []
        for v in variables:
            value = v.value
            if not isinstance(value, torch.nn.Parameter):
                raise ValueError(
                    "The Keras model's variables are not torch parameters (torch backend)."
                )
            params.append(value)
        self._model = model
        self._variables = variables
        self._params = params
        self._tensors: list[torch.Tensor] = list(params)
        self.spec = ParamSpec.from_tensors(dict(zip(names, params, strict=True)))
        self.outputs_probabilities = (
            ends_in_softmax(model) if outputs_probabilities is None else outputs_probabilities
        )

    @property
    def module(self) -> keras.Model:
        return self._model

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def trainable(self) -> list[TrainableSlice]:
        # Read at each call: freezing a layer (``layer.trainable = False``) changes the set.
        return [
            TrainableSlice(param, t.offset, t.numel)
            for v, param, t in zip(self._variables, self._params, self.spec.tensors, strict=True)
            if v.trainable
        ]

    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        out = self._model(x, training=training)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"The Keras model must return one tensor, got {type(out).__name__}.")
        return out

    def train_mode(self, training: bool) -> None:
        # Keras layers follow the ``training=`` call argument that ``forward`` passes; the torch
        # flag matters only for torch modules wrapped inside the model (TorchModuleWrapper).
        self._model.train(training)
