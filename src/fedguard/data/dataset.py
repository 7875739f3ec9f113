"""Data sets: the one shape every loader returns and every client trains on.

A data set is a pair of arrays, features ``x`` (``float32``, channels-first for images) and integer
labels ``y``, plus an optional ``groups`` column that names the natural owner of each sample
(a speaker, a hospital) for the natural partition. Clients hold index slices of the training set,
never copies made per round.

A training set too large to hold can be an :class:`OnDemandDataset` instead: its labels are held,
its features made from sample indices when a client reads them (``data.synthetic_on_demand``
makes the synthetic set this way), so a federation of many clients holds only labels.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedguard.data.errors import DataError


def _check_length(what: str, values: np.ndarray | None, y: np.ndarray) -> None:
    """Refuse per-sample ``values`` (features, groups, an index) of another length than the
    labels ``y``; None is no values."""
    if values is not None and values.shape[0] != y.shape[0]:
        raise ValueError(f"{what} and labels differ in length: {values.shape[0]} vs {y.shape[0]}.")


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` of shape ``[N, ...]`` (float32) and labels ``y`` of shape ``[N]`` (int64)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_length("Features", self.x, self.y)
        _check_length("Groups", self.groups, self.y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features (without the batch axis)."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at ``indices``, in that order."""
        groups = None if self.groups is None else self.groups[indices]
        return ArrayDataset(self.x[indices], self.y[indices], groups)


# ``make(indices)``: the float32 features ``[n, *sample_shape]`` of the samples ``indices [n]``.
RowMaker = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class OnDemandDataset:
    """A training set whose features are made when asked for, never held: labels ``y [N]`` (and
    ``groups``) are held; ``make(indices)`` returns the features of the samples ``indices``.

    ``make`` must give a sample the same values on every call, whatever other samples it is asked
    for with, and should be picklable (another process may rebuild a client's features).
    ``index`` names which of ``make``'s samples the rows of this set are (None: row ``i`` is
    sample ``i``), so a subset is a new index array, not a copy of features.
    """

    make: RowMaker
    y: np.ndarray
    sample_shape: tuple[int, ...]
    groups: np.ndarray | None = None
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_length("Groups", self.groups, self.y)
        _check_length("Index", self.index, self.y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> OnDemandDataset:
        """The samples at ``indices``, in that order; no features are made."""
        indices = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else self.groups[indices]
        index = indices if self.index is None else self.index[indices]
        return OnDemandDataset(self.make, self.y[indices], self.sample_shape, groups, index)

    def rows(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The features ``[n, *sample_shape]`` of this set's rows at ``positions`` (default:
        every row), made now."""
        rows = np.arange(len(self)) if positions is None else np.asarray(positions, np.int64)
        samples = rows if self.index is None else self.index[rows]
        x = np.asarray(self.make(samples), dtype=np.float32)
        if x.shape != (len(samples), *self.sample_shape):
            raise ValueError(
                f"The row maker returned features of shape {x.shape} for {len(samples)} samples "
                f"of shape {self.sample_shape}."
            )
        return x

    def materialise(self) -> ArrayDataset:
        """Every row's features made and held: the same data as an :class:`ArrayDataset`."""
        return ArrayDataset(self.rows(), self.y, self.groups)


TrainingSet = ArrayDataset | OnDemandDataset


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded data set: train (partitioned over clients), optional validation, and test."""

    name: str
    train: TrainingSet
    test: ArrayDataset
    num_classes: int
    val: ArrayDataset | None = None
    class_names: tuple[str, ...] = ()
    info: dict[str, object] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features (without the batch axis)."""
        return self.train.sample_shape


@dataclass(frozen=True)
class FederatedDataset:
    """Data that is already split by owner: one training set per named client, plus a test set.

    Return this from your own data function when the partition is natural (hospitals, speakers);
    return :class:`DatasetSplits` instead to let fedguard partition a pooled training set. A
    client's training set may be an :class:`OnDemandDataset`.
    """

    clients: Mapping[str, TrainingSet]  # a dict of ArrayDataset values is accepted as it is
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


def check_arrays(
    x: np.ndarray, y: np.ndarray, *, num_classes: int, what: str, allow_empty: bool = False
) -> None:
    """Refuse, with a :class:`DataError` naming ``what``, data that would fail only in training.

    Features must be a numeric array ``[N, ...]`` of finite values, labels ``[N]`` whole numbers
    in ``0 .. num_classes - 1``, and (unless ``allow_empty``) ``N`` at least 1.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what}: the features have dtype {x.dtype}; expected numbers")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{what}: the labels have dtype {y.dtype}; expected integers")
    if x.ndim < 2:
        raise DataError(f"{what}: the features have shape {x.shape}; expected [samples, ...]")
    if y.ndim != 1:
        raise DataError(f"{what}: the labels have shape {y.shape}; expected [samples]")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{what}: {x.shape[0]} feature rows but {y.shape[0]} labels; they must match"
        )
    if y.shape[0] == 0:
        if allow_empty:
            return
        raise DataError(f"{what}: holds no samples")
    if x.dtype.kind == "f":
        _check_finite(x, what)
    _check_label_values(y, num_classes, what)


def check_on_demand(d: OnDemandDataset, *, num_classes: int, what: str) -> None:
    """:func:`check_arrays` for an :class:`OnDemandDataset`: every label, and the features of
    its first sample (made now: the others are made when a client reads them, by the same code)."""
    check_arrays(d.rows(np.arange(min(1, len(d)))), d.y[:1], num_classes=num_classes, what=what)
    _check_label_values(np.asarray(d.y), num_classes, what)


_FINITE_ROWS = 4096  # rows checked at once: bounds the temporary of a large training set


def _check_finite(x: np.ndarray, what: str) -> None:
    """Refuse features with NaN or infinite values, naming how many samples hold them."""
    flat = x.reshape(x.shape[0], -1)
    bad = np.concatenate(
        [
            ~np.isfinite(flat[start : start + _FINITE_ROWS]).all(axis=1)
            for start in range(0, flat.shape[0], _FINITE_ROWS)
        ]
    )
    if bad.any():
        raise DataError(
            f"{what}: the features of {int(bad.sum())} sample(s) hold NaN or infinite values "
            f"(the first is sample {int(np.argmax(bad))})"
        )


def _check_label_values(y: np.ndarray, num_classes: int, what: str) -> None:
    """Refuse labels that are not whole numbers in ``0 .. num_classes - 1`` (``y`` non-empty)."""
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{what}: the labels must be whole numbers (class indices)")
    low, high = y.min(), y.max()
    if low < 0 or high >= num_classes:
        wrong = low if low < 0 else high
        raise DataError(
            f"{what}: label {wrong:g} is out of range: {num_classes} classes allow "
            f"0..{num_classes - 1}"
        )


def read_client_npz(
    path: str | Path, *, num_classes: int
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """A deployed client's own data: ``x``, ``y`` and optionally ``x_eval``, ``y_eval``.

    Returns the training set and the evaluation set (``None`` when the file has none), checked
    with :func:`check_arrays`; every problem is a one-line :class:`DataError` naming the file.
    Object arrays are refused without being unpickled.
    """
    p = Path(path)
    try:
        npz = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a directory, not an .npz file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # without a zip or .npy header NumPy tries pickle, which allow_pickle=False refuses
        reason = "no NumPy header" if "pickle" in str(exc) else _reason(exc)
        raise DataError(f"{p}: not an .npz file ({reason})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: a single .npy array, not an .npz holding x and y")
    arrays: dict[str, np.ndarray] = {}
    with npz:
        for name in ("x", "y", "x_eval", "y_eval"):
            if name not in npz.files:
                continue
            try:
                arrays[name] = npz[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DataError(
                        f"{p}: the array {name!r} holds Python objects (object dtype); "
                        "store numbers"
                    ) from None
                raise DataError(
                    f"{p}: the array {name!r} cannot be read ({_reason(exc)})"
                ) from None
            except (OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
                raise DataError(
                    f"{p}: the array {name!r} cannot be read ({_reason(exc)})"
                ) from None
    missing = sorted({"x", "y"} - set(arrays))
    if missing:
        raise DataError(f"{p}: lacks the arrays {missing}")
    check_arrays(arrays["x"], arrays["y"], num_classes=num_classes, what=f"{p} (x, y)")
    train = ArrayDataset(arrays["x"], arrays["y"])
    if ("x_eval" in arrays) != ("y_eval" in arrays):
        raise DataError(f"{p}: x_eval and y_eval go together; the file holds only one of them")
    if "x_eval" not in arrays:
        return train, None
    what = f"{p} (x_eval, y_eval)"
    check_arrays(arrays["x_eval"], arrays["y_eval"], num_classes=num_classes, what=what)
    if arrays["x_eval"].shape[1:] != arrays["x"].shape[1:]:
        raise DataError(
            f"{what}: samples of shape {arrays['x_eval'].shape[1:]} but x has "
            f"{arrays['x'].shape[1:]}"
        )
    return train, ArrayDataset(arrays["x_eval"], arrays["y_eval"])


def _reason(exc: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
