"""In-memory data sets: the one shape every loader returns and every client trains on.

A data set is a pair of arrays, features ``x`` (``float32``, channels-first for images) and integer
labels ``y``, plus an optional ``groups`` column that names the natural owner of each sample
(a speaker, a hospital) for the natural partition. Clients hold index slices of the training set,
never copies made per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` of shape ``[N, ...]`` (float32) and labels ``y`` of shape ``[N]`` (int64)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Features and labels differ in length: {self.x.shape[0]} vs {self.y.shape[0]}."
            )
        if self.groups is not None and self.groups.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Groups and labels differ in length: {self.groups.shape[0]} vs {self.y.shape[0]}."
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at ``indices``, in that order."""
        groups = None if self.groups is None else self.groups[indices]
        return ArrayDataset(self.x[indices], self.y[indices], groups)


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded data set: train (partitioned over clients), optional validation, and test."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    val: ArrayDataset | None = None
    class_names: tuple[str, ...] = ()
    info: dict[str, object] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features (without the batch axis)."""
        return tuple(int(d) for d in self.train.x.shape[1:])


@dataclass(frozen=True)
class FederatedDataset:
    """Data that is already split by owner: one training set per named client, plus a test set.

    Return this from your own data function when the partition is natural (hospitals, speakers);
    return :class:`DatasetSplits` instead to let fedguard partition a pooled training set.
    """

    clients: dict[str, ArrayDataset]
    test: ArrayDataset
    num_classes: int
    val: ArrayDataset | None = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("A federated data set needs at least one client.")
        empty = [name for name, d in self.clients.items() if len(d) == 0]
        if empty:
            raise ValueError(f"Clients without training data: {', '.join(empty[:5])}.")
