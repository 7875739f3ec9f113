"""The scikit-learn digits task that several benchmarks share: its splits and its small MLP.

A 10-class task that trains in seconds, for benchmarks that sweep many runs (robust aggregators
against attacks, optimizers against label skew). Benchmarks import it as a sibling module (their
own folder is first on ``sys.path`` when run as scripts).
"""

from __future__ import annotations

import numpy as np


def digits_data(validation: int = 0):
    """scikit-learn's 8x8 digits as [N, 1, 8, 8] images in [0, 1]: a stratified 25% test split,
    then, when ``validation`` > 0, that many stratified validation images out of the rest (a
    tuning split no client holds); the training set is what remains."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from fedguard.data.dataset import ArrayDataset, DatasetSplits

    bunch = datasets.load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    val = None
    if validation > 0:
        x_tr, x_va, y_tr, y_va = train_test_split(
            x_tr, y_tr, test_size=validation, random_state=0, stratify=y_tr
        )
        val = ArrayDataset(x_va, y_va)
    return DatasetSplits(
        "digits",
        ArrayDataset(x_tr, y_tr),
        ArrayDataset(x_te, y_te),
        10,
        val=val,
        class_names=tuple(str(c) for c in range(10)),
    )


def mlp(input_shape: tuple[int, ...], num_classes: int):
    """Flatten, inputs -> 32 ReLU -> classes (64 -> 32 -> 10 on the digits)."""
    from torch import nn

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(np.prod(input_shape)), 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )
