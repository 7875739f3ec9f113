"""The built-in PyTorch models: the project brief's, and a speech CNN that learns from plain settings."""

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


SPEECH_CHANNELS = (64, 64, 64)  # the temporal conv blocks of speech_cnn
SPEECH_GROUPS = 4  # GroupNorm groups in each block


def speech_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A compact keyword-spotting CNN over time: the mel bands are the channels of three blocks
    of (Conv1d 3 pad 1, GroupNorm, relu, max-pool 2) with 64 channels each, global max pooling
    over time, Dense classes (about 33k weights on 40 mel bands).

    ``input_shape`` is ``(1, mel_bands, frames)`` of the log-mel features (at least 8 frames).
    It learns from plain settings (FedAvg, Adam 1e-3, one local epoch; see
    ``benchmarks/speech_model.py``): convolving over time with the whole spectrum as input, as
    temporal-convolution keyword spotters do (Choi et al. 2019, "Temporal Convolution for
    Real-time Keyword Spotting on Mobile Devices"), lets the first layer see every frequency at
    once, and the global max over time asks only *whether* a pattern occurs, not where in the
    second the word was spoken, so early, late, fast or slow words look alike (the brief's
    single convolution into a dense layer of 4M weights must learn every position separately).
    GroupNorm without affine weights, not BatchNorm: it normalises within one example, so
    DP-SGD's per-example gradients and the cohort engine's stacked training (no running
    statistics shared by the cohort) apply, and the per-example gradients stay on the fast
    hook path.
    """
    _, bands, frames = input_shape
    if frames < 8:
        raise ValueError(f"speech_cnn needs at least 8 frames, got {input_shape}.")
    layers: list[nn.Module] = [nn.Flatten(1, 2)]  # [N, 1, bands, frames] -> [N, bands, frames]
    width = input_shape[0] * bands
    for out in SPEECH_CHANNELS:
        layers += [
            nn.Conv1d(width, out, 3, padding=1),
            nn.GroupNorm(SPEECH_GROUPS, out, affine=False),
            nn.ReLU(),
            nn.MaxPool1d(2),
        ]
        width = out
    return nn.Sequential(
        *layers,
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def brief_speech_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The project brief's speech model: Conv 1->32 3x3 pad 1, relu, max-pool 2, fc -> 128,
    relu, fc -> classes.

    ``input_shape`` is ``(1, mel_bands, frames)`` of the log-mel features. On FSDD's default
    features its first dense layer holds 4M weights; it needs tuned settings (the smart-home
    example's) to learn, and stays near chance with plain ones (:func:`speech_cnn` does not).
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
    "brief_speech_cnn": brief_speech_cnn,
    "logistic_regression": logistic_regression,
}


def check_dtype(module: nn.Module) -> None:
    """Refuse modules whose parameters are not floating point (nothing to train)."""
    for name, p in module.named_parameters():
        if not torch.is_floating_point(p):
            raise ValueError(f"Parameter {name!r} is {p.dtype}; only float parameters train.")
