"""MedMNIST v2 2D files (``.npz``) as :class:`DatasetSplits`.

Every 2D MedMNIST v2 archive (PneumoniaMNIST, OrganAMNIST, BloodMNIST, ...) stores the same six
arrays: ``{train,val,test}_images`` (``uint8``, ``[N, H, W]`` grayscale or ``[N, H, W, 3]`` RGB,
``H = W`` in 28, 64, 128 or 224) and ``{train,val,test}_labels`` (``[N, 1]``). One loader therefore
serves the bundled subset and every full download. Multi-label files (ChestMNIST, labels
``[N, 14]``) and 3D volumes are refused: the rest of the framework trains single-label classifiers.

Reference: Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical
image classification", Scientific Data 10, 41 (2023).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedguard.data.dataset import ArrayDataset, DatasetSplits
from fedguard.data.errors import DataError

SPLITS = ("train", "val", "test")


def load_medmnist(path: str | Path) -> DatasetSplits:
    """Load a single-label MedMNIST v2 2D ``.npz`` file.

    Images become ``float32`` in ``[0, 1]`` (``uint8 / 255``), channels-first ``[N, C, H, W]``;
    labels become ``int64`` ``[N]``. ``num_classes`` is the largest label over all splits plus one,
    and the data set is named after the file stem (``pneumoniamnist.npz`` -> ``"pneumoniamnist"``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file {path} does not exist.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"MedMNIST file {path} is not a readable NumPy .npz archive.") from exc
    with archive:
        missing = [
            f"{split}_{kind}"
            for split in SPLITS
            for kind in ("images", "labels")
            if f"{split}_{kind}" not in archive.files
        ]
        if missing:
            raise DataError(f"MedMNIST file {path} lacks the key(s) {', '.join(missing)}.")
        parts = {
            split: _split(path, split, archive[f"{split}_images"], archive[f"{split}_labels"])
            for split in SPLITS
        }
    num_classes = max(int(part.y.max(initial=-1)) for part in parts.values()) + 1
    return DatasetSplits(
        name=path.stem,
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=num_classes,
        info={"source": str(path)},
    )


def _split(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    """Check and convert one split's arrays; ``path`` and ``split`` only name it in errors."""
    return ArrayDataset(_images(path, split, images), _labels(path, split, labels))


def _images(path: Path, split: str, images: np.ndarray) -> np.ndarray:
    """``uint8`` ``[N, H, W]`` or ``[N, H, W, C]`` -> ``float32`` ``[N, C, H, W]`` in ``[0, 1]``."""
    if images.dtype != np.uint8:
        raise DataError(
            f"MedMNIST file {path} stores {split}_images as {images.dtype}, expected uint8."
        )
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"MedMNIST file {path} has {split}_images of shape {images.shape}: only 2D images "
            "[N, H, W] or [N, H, W, 1 or 3] are supported."
        )
    scaled = np.empty(images.shape, dtype=np.float32)
    np.divide(images, np.float32(255.0), out=scaled, casting="unsafe")
    return scaled


def _labels(path: Path, split: str, labels: np.ndarray) -> np.ndarray:
    """``[N, 1]`` (or ``[N]``) integer labels -> ``int64`` ``[N]``; multi-label data is refused."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"MedMNIST file {path} has {labels.shape[1]} label columns in {split}_labels: only "
            "single-label 2D files are supported (ChestMNIST is multi-label)."
        )
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"MedMNIST file {path} has {split}_labels of shape {labels.shape} and dtype "
            f"{labels.dtype}, expected integers of shape [N, 1]."
        )
    flat = labels.reshape(-1).astype(np.int64)
    if flat.size and flat.min() < 0:
        raise DataError(f"MedMNIST file {path} has negative labels in {split}_labels.")
    return flat
