"""The built-in models in Keras 3 (torch backend), the same networks as :mod:`torch_models`.

Inputs are channels-first ``[N, C, H, W]`` float32 arrays, as for the torch models, so the
convolution and pooling layers say ``data_format="channels_first"`` (whatever ``keras.json``
says), and ``Flatten`` keeps torch's ``(C, H, W)`` order, so each model computes exactly what its
torch twin computes given the same weights (Keras kernels are the torch weights transposed). The
models end in a softmax, Keras style; the returned models are built.
"""

from __future__ import annotations

# Imported first: it sets KERAS_BACKEND=torch (unless set) and refuses any other backend.
from fedguard.models import keras_adapter  # noqa: F401

# isort: split

import keras

from fedguard.models import torch_models

_FIRST = "channels_first"
# Flatten in torch's (C, H, W) order: a plain reshape, so the Dense kernels match torch_models'.
_TORCH_ORDER = "channels_last"
# Layers with weights are named: Keras numbers unnamed layers from a per-process counter
# ("dense", "dense_1", ...), and the variable paths name the flat vector's tensors, so two
# builds of one model must agree on them.


def image_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Conv 32 3x3 relu, max-pool 2, Conv 64 3x3 relu, max-pool 2, Dense 64 relu, Dense softmax.

    Made for 28x28 images with any channel count: ``input_shape`` is ``(channels, height, width)``.
    """
    _, height, width = input_shape
    if ((height - 2) // 2 - 2) // 2 < 1 or ((width - 2) // 2 - 2) // 2 < 1:
        raise ValueError(f"image_cnn needs images of at least 10x10 pixels, got {input_shape}.")
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(32, 3, activation="relu", data_format=_FIRST, name="conv1"),
            keras.layers.MaxPooling2D(2, data_format=_FIRST),
            keras.layers.Conv2D(64, 3, activation="relu", data_format=_FIRST, name="conv2"),
            keras.layers.MaxPooling2D(2, data_format=_FIRST),
            keras.layers.Flatten(data_format=_TORCH_ORDER),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="image_cnn",
    )


def speech_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """:func:`fedguard.models.torch_models.speech_cnn` in Keras: the mel bands as the channels
    of three blocks of (Conv1D 64 3 same padding, GroupNormalization 4 groups without centre or
    scale, relu, max-pool 2), global max pooling over time, Dense softmax.

    ``input_shape`` is ``(1, mel_bands, frames)`` of the log-mel features (at least 8 frames).
    GroupNormalization's epsilon is torch's (1e-5), so both compute the same function.
    """
    channels, bands, frames = input_shape
    if frames < 8:
        raise ValueError(f"speech_cnn needs at least 8 frames, got {input_shape}.")
    layers: list[keras.layers.Layer] = [
        keras.Input(shape=input_shape),
        keras.layers.Reshape((channels * bands, frames)),
    ]
    for i, out in enumerate(torch_models.SPEECH_CHANNELS, start=1):
        layers += [
            keras.layers.Conv1D(out, 3, padding="same", data_format=_FIRST, name=f"conv{i}"),
            keras.layers.GroupNormalization(
                torch_models.SPEECH_GROUPS, axis=1, epsilon=1e-5, center=False, scale=False
            ),
            keras.layers.ReLU(),
            keras.layers.MaxPooling1D(2, data_format=_FIRST),
        ]
    layers += [
        keras.layers.GlobalMaxPooling1D(data_format=_FIRST),
        keras.layers.Dense(num_classes, activation="softmax", name="output"),
    ]
    return keras.Sequential(layers, name="speech_cnn")


def brief_speech_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The project brief's speech model: Conv 32 3x3 same padding relu, max-pool 2, Dense 128
    relu, Dense softmax (:func:`fedguard.models.torch_models.brief_speech_cnn`).

    ``input_shape`` is ``(1, mel_bands, frames)`` of the log-mel features.
    """
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(
                32, 3, padding="same", activation="relu", data_format=_FIRST, name="conv1"
            ),
            keras.layers.MaxPooling2D(2, data_format=_FIRST),
            keras.layers.Flatten(data_format=_TORCH_ORDER),
            keras.layers.Dense(128, activation="relu", name="fc1"),
            keras.layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="brief_speech_cnn",
    )


def logistic_regression(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Multinomial logistic regression: one softmax layer on the flattened features."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Flatten(data_format=_TORCH_ORDER),
            keras.layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="logistic_regression",
    )


BUILTIN = {
    "image_cnn": image_cnn,
    "speech_cnn": speech_cnn,
    "brief_speech_cnn": brief_speech_cnn,
    "logistic_regression": logistic_regression,
}
