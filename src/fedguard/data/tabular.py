"""Tabular data sets bundled with scikit-learn (no download).

The Wisconsin diagnostic breast cancer data (569 samples, 30 real features, malignant vs benign) is
a small tabular benchmark for cross-silo examples: it loads offline and trains in seconds.

Reference: Street, Wolberg and Mangasarian, "Nuclear feature extraction for breast tumor diagnosis",
IS&T/SPIE Electronic Imaging 1993; scikit-learn's ``load_breast_cancer``.
"""

from __future__ import annotations

import numpy as np

from fedguard.data.dataset import ArrayDataset, DatasetSplits
from fedguard.data.errors import DataError


def load_breast_cancer(*, test_fraction: float, seed: int) -> DatasetSplits:
    """Breast cancer data, split stratified by label, standardised with training statistics.

    ``test_fraction`` of the samples (rounded up, as scikit-learn does) form the test set, drawn
    with ``random_state=seed`` and stratified so both splits keep the class ratio. Each feature is
    standardised as ``(x - mean) / std`` with mean and std from the training split only, so no test
    information leaks into training. There is no validation split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    # imported here: scikit-learn (and the SciPy it loads) costs every process that imports the
    # data registry, the driver and each Ray actor, about 50 MiB that no other data set needs
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = datasets.load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0.0] = 1.0
    return DatasetSplits(
        name="breast_cancer",
        train=ArrayDataset(((x_train - mean) / std).astype(np.float32), y_train),
        test=ArrayDataset(((x_test - mean) / std).astype(np.float32), y_test),
        num_classes=len(bunch.target_names),
        class_names=tuple(str(name) for name in bunch.target_names),
        info={"feature_names": tuple(str(name) for name in bunch.feature_names)},
    )
