"""Data-poisoning attacks, applied by a malicious client to its own training data.

* Label flipping: ``y -> C - 1 - y`` for ``C`` classes, or any given permutation of the classes
  (Biggio et al. 2012; the FL setting of Tolpegin et al., ESORICS 2020).
* Backdoor: a pixel-pattern trigger (a ``size x size`` square of value ``value``, by default the
  largest value of the images, in every channel, ``margin`` pixels from a corner) stamped into a
  fraction of the images, whose labels become the target class (BadNets: Gu, Dolan-Gavitt, Garg,
  2017; in FL: Bagdasaryan et al., AISTATS 2020). Its success is measured on triggered test images
  whose true label is not the target: the fraction classified as the target.

Images are NCHW or NHWC float arrays or tensors (NumPy or PyTorch); results have the input's type.
Nothing is modified in place.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fedguard.algorithms.robust import base as robust_base

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class Corner(enum.StrEnum):
    TOP_LEFT = "top_left"
    TOP_RIGHT = "top_right"
    BOTTOM_LEFT = "bottom_left"
    BOTTOM_RIGHT = "bottom_right"


class Layout(enum.StrEnum):
    NCHW = "nchw"
    NHWC = "nhwc"


@dataclass(frozen=True)
class Trigger:
    """Where and how the backdoor square is drawn; ``value=None`` means the images' maximum."""

    size: int = 3
    corner: Corner = Corner.BOTTOM_RIGHT
    margin: int = 1
    value: float | None = None
    layout: Layout = Layout.NCHW

    def __post_init__(self) -> None:
        if self.size < 1 or self.margin < 0:
            raise robust_base.RobustnessError(
                f"A trigger needs size >= 1 and margin >= 0, got {self.size} and {self.margin}."
            )


def flip_labels(
    labels: Array, *, num_classes: int, permutation: Sequence[int] | None = None
) -> Array:
    """``num_classes - 1 - y``, or ``permutation[y]`` when a permutation of the classes is given."""
    mapping = list(range(num_classes - 1, -1, -1)) if permutation is None else list(permutation)
    if sorted(mapping) != list(range(num_classes)):
        raise robust_base.RobustnessError(
            f"The label map must be a permutation of 0..{num_classes - 1}, got {mapping}."
        )
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise robust_base.RobustnessError(f"Labels must lie in 0..{num_classes - 1}.")
    if isinstance(labels, torch.Tensor):
        return torch.tensor(mapping, dtype=labels.dtype, device=labels.device)[labels.long()]
    return np.asarray(mapping, dtype=labels.dtype)[labels.astype(np.int64)]


def shuffle_labels(
    labels: torch.Tensor, *, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Label noise: each label joins a shuffle with ``probability``; the chosen labels are then
    randomly permuted among themselves (the class counts are kept, the pairing with the inputs
    is lost). A low-quality client that trains on them is honest but worth little."""
    if not 0.0 <= probability <= 1.0:
        raise robust_base.RobustnessError(
            f"The label-noise probability must be in [0, 1], got {probability}."
        )
    chosen = torch.nonzero(torch.rand(labels.shape[0], generator=generator) < probability)
    chosen = chosen.flatten()
    out = labels.clone()
    order = torch.randperm(chosen.shape[0], generator=generator)
    out[chosen] = labels[chosen[order]]
    return out


def trigger_mask(height: int, width: int, trigger: Trigger) -> tuple[slice, slice]:
    """The rows and columns the trigger covers in an image of ``height x width``."""
    end = trigger.margin + trigger.size
    if end > min(height, width):
        raise robust_base.RobustnessError(
            f"A {trigger.size}-pixel trigger {trigger.margin} pixels from the edge does not fit "
            f"a {height}x{width} image."
        )
    top = trigger.corner in (Corner.TOP_LEFT, Corner.TOP_RIGHT)
    left = trigger.corner in (Corner.TOP_LEFT, Corner.BOTTOM_LEFT)
    rows = slice(trigger.margin, end) if top else slice(height - end, height - trigger.margin)
    cols = slice(trigger.margin, end) if left else slice(width - end, width - trigger.margin)
    return rows, cols


def stamp_trigger(images: Array, trigger: Trigger) -> Array:
    """A copy of ``images [N, C, H, W]`` (or ``[N, H, W, C]``) with the trigger drawn in."""
    if images.ndim != 4:
        raise robust_base.RobustnessError(
            f"Images must be a 4-d batch ({trigger.layout.value}), got shape {tuple(images.shape)}."
        )
    out = images.clone() if isinstance(images, torch.Tensor) else images.copy()
    value = float(images.max()) if trigger.value is None else trigger.value
    if trigger.layout is Layout.NCHW:
        rows, cols = trigger_mask(images.shape[2], images.shape[3], trigger)
        out[:, :, rows, cols] = value
    else:
        rows, cols = trigger_mask(images.shape[1], images.shape[2], trigger)
        out[:, rows, cols, :] = value
    return out


def poison_backdoor(
    images: Array,
    labels: Array,
    *,
    trigger: Trigger,
    target: int,
    fraction: float,
    generator: torch.Generator,
) -> tuple[Array, Array, list[int]]:
    """Stamp ``round(fraction * N)`` random images and relabel them ``target``.

    Returns copies of the images and labels and the sorted indices of the poisoned samples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise robust_base.RobustnessError(
            f"The poisoned fraction must be in [0, 1], got {fraction}."
        )
    n = images.shape[0]
    chosen = sorted(torch.randperm(n, generator=generator)[: round(fraction * n)].tolist())
    out_images = images.clone() if isinstance(images, torch.Tensor) else images.copy()
    out_labels = labels.clone() if isinstance(labels, torch.Tensor) else labels.copy()
    if chosen:
        out_images[chosen] = stamp_trigger(images[chosen], trigger)
        out_labels[chosen] = target
    return out_images, out_labels, chosen


def attack_success_rate(predictions: Array, labels: Array, *, target: int) -> float:
    """Fraction of triggered test images with a true label other than ``target`` predicted as it."""
    keep = labels != target
    count = int(keep.sum())
    if count == 0:
        raise robust_base.RobustnessError(
            f"Every test label is the target {target}: the success rate is undefined."
        )
    return int((predictions[keep] == target).sum()) / count
