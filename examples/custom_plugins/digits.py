"""The example's data and model: scikit-learn's 8x8 digits and a small MLP.

``digits`` splits the 1,797 images (pixels / 16, shape [1, 8, 8], 10 classes) into a test set
(25%, stratified), a validation set of 150 images and the training set that fedguard partitions
over the clients. The validation set never reaches a client: ``root_set`` takes FLTrust's root
data from it, a small set the server holds in its own right.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split

from fedguard.data.dataset import ArrayDataset, DatasetSplits

VALIDATION = 150


def _splits(seed: int) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    bunch = datasets.load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VALIDATION, random_state=seed, stratify=y_rest
    )
    return (
        ArrayDataset(x_train, y_train),
        ArrayDataset(x_val, y_val),
        ArrayDataset(x_test, y_test),
    )


def digits(seed: int = 0) -> DatasetSplits:
    """Train (partitioned over the clients), validation (the server's) and test splits."""
    train, val, test = _splits(seed)
    names = tuple(str(c) for c in range(10))
    return DatasetSplits("digits", train, test, 10, val=val, class_names=names)


def root_set(examples: int, seed: int = 0) -> ArrayDataset:
    """The first ``examples`` images of the validation split: FLTrust's root data."""
    _, val, _ = _splits(seed)
    if not 1 <= examples <= len(val):
        raise ValueError(f"The root set takes 1..{len(val)} validation images, got {examples}.")
    return val.subset(np.arange(examples))


def mlp(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """Flatten, 64 -> 32 ReLU -> classes."""
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(int(np.prod(input_shape)), 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, num_classes),
    )
