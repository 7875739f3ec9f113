"""Training-time augmentations: pure functions of a batch and a generator.

Applied by the client to each training batch (never to evaluation data), so every participant
augments its own data locally and the same seed gives the same batches.

* ``image``: random affine jitter (translation up to 10 %, rotation up to 10 degrees, scale
  0.9-1.1), the standard light augmentation for small medical and natural images.
* ``spectrogram``: SpecAugment-style masking (Park et al. 2019): one band of up to 15 % of the
  frequency bins and one span of up to 15 % of the frames set to the utterance mean (zero after
  per-utterance normalisation).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class AugmentKind(enum.StrEnum):
    NONE = "none"
    IMAGE = "image"
    SPECTROGRAM = "spectrogram"


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_translate: float = 0.1,
    max_degrees: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Per-sample random translation, rotation and scaling of ``[B, C, H, W]`` images."""
    if x.ndim != 4:
        raise ValueError(f"Image augmentation needs [B, C, H, W] batches, got {tuple(x.shape)}.")
    b = x.shape[0]
    angle = _uniform(b, -max_degrees, max_degrees, generator) * (math.pi / 180.0)
    scale = _uniform(b, scale_range[0], scale_range[1], generator)
    tx = _uniform(b, -2 * max_translate, 2 * max_translate, generator)
    ty = _uniform(b, -2 * max_translate, 2 * max_translate, generator)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def spec_mask(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_freq_fraction: float = 0.15,
    max_time_fraction: float = 0.15,
) -> torch.Tensor:
    """Zero one random frequency band and one random time span per ``[B, C, F, T]`` sample."""
    if x.ndim != 4:
        raise ValueError(f"Spectrogram masking needs [B, C, F, T] batches, got {tuple(x.shape)}.")
    b, _, n_freq, n_time = x.shape
    out = x.clone()
    freq = torch.arange(n_freq).view(1, n_freq, 1)
    time = torch.arange(n_time).view(1, 1, n_time)
    f_width = (torch.rand(b, generator=generator) * max_freq_fraction * n_freq).long()
    f_start = (torch.rand(b, generator=generator) * (n_freq - f_width + 1)).long()
    t_width = (torch.rand(b, generator=generator) * max_time_fraction * n_time).long()
    t_start = (torch.rand(b, generator=generator) * (n_time - t_width + 1)).long()
    f_mask = (freq >= f_start.view(b, 1, 1)) & (freq < (f_start + f_width).view(b, 1, 1))
    t_mask = (time >= t_start.view(b, 1, 1)) & (time < (t_start + t_width).view(b, 1, 1))
    mask = (f_mask | t_mask).unsqueeze(1)
    return out.masked_fill_(mask, 0.0)


def get(kind: AugmentKind | str) -> Augmentation | None:
    """The augmentation function for a config value (``None`` for ``"none"``)."""
    kind = AugmentKind(kind)
    if kind is AugmentKind.IMAGE:
        return random_affine
    if kind is AugmentKind.SPECTROGRAM:
        return spec_mask
    return None
