"""The built-in PyTorch models, exactly as the project's brief describes them."""

from __future__ import annotations

import math

import torch
from torch import nn


def _two_conv_pool_size(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """Channels in, and the height and width left after two (3x3 conv, 2x2 max-pool) stages."""
    channels, height, width = input_shape
    h, w = ((height - 2) // 2 - 2) // 2, ((width - 2) // 2 - 2) // 2
    if h < 1 or w < 1:
        raise ValueError(f"{model} needs images of at least 10x10 pixels, got {input_shape}.")
    return channels, h, w


def image_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv 32 3x3 relu, max-pool 2, Conv 64 3x3 relu, max-pool 2, Dense 64 relu, Dense classes.

    Returns logits (the softmax is in the loss). Made for 28x28 images with any channel count.
    """
    channels, h, w = _two_conv_pool_size(input_shape, "image_cnn")
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * h * w, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def dp_image_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small CNN for DP-SGD: Conv 16 3x3, GroupNorm, tanh, max-pool 2, Conv 32 3x3, GroupNorm,
    tanh, max-pool 2, Dense classes (about 6k weights on 28x28 images).

    Made for training with noise: the noise DP-SGD adds grows with the number of weights, so the
    model is 20 times smaller than :func:`image_cnn`; bounded activations (tanh) keep gradients
    near the clip bound (Papernot et al. 2021, "Tempered sigmoid activations for deep learning
    with differential privacy"); GroupNorm, not BatchNorm, normalises within one example, and has
    no affine weights, so per-example gradients stay on the fast hook path.
    """
    channels, h, w = _two_conv_pool_size(input_shape, "dp_image_cnn")
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3),
        nn.GroupNorm(4, 16, affine=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.GroupNorm(4, 32, affine=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * h * w, num_classes),
    )


def speech_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv 1->32 3x3 pad 1, relu, max-pool 2, fc -> 128, relu, fc -> classes.

    ``input_shape`` is ``(1, mel_bands, frames)`` of the log-mel features.
    """
    channels, bands, frames = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (bands // 2) * (frames // 2), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def logistic_regression(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


BUILTIN = {
    "image_cnn": image_cnn,
    "dp_image_cnn": dp_image_cnn,
    "speech_cnn": speech_cnn,
    "logistic_regression": logistic_regression,
}


def check_dtype(module: nn.Module) -> None:
    """Refuse modules whose parameters are not floating point (nothing to train)."""
    for name, p in module.named_parameters():
        if not torch.is_floating_point(p):
            raise ValueError(f"Parameter {name!r} is {p.dtype}; only float parameters train.")
