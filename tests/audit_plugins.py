"""Data functions named in the privacy-audit tests' configs (``"audit_plugins:name"``)."""

from __future__ import annotations

import numpy as np

from fedguard.data.dataset import ArrayDataset, DatasetSplits


def random_labels() -> DatasetSplits:
    """144 Gaussian features with labels that carry no signal: a model can only memorise its
    training records, so membership is as visible as it gets (80 training, 160 test records)."""
    rng = np.random.default_rng(11)

    def split(n: int) -> ArrayDataset:
        x = rng.normal(size=(n, 1, 12, 12)).astype(np.float32)
        return ArrayDataset(x, rng.integers(0, 2, size=n).astype(np.int64))

    return DatasetSplits("random_labels", split(80), split(160), num_classes=2)
