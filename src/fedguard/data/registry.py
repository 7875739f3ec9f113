"""Data sets by name: the one entry point that configurations and the CLI call.

Built-in names are ``"pneumoniamnist"`` (any single-label MedMNIST v2 2D file via ``path``),
``"breast_cancer"``, ``"synthetic"`` and ``"fsdd"``. A name of the form
``"package.module:callable"`` loads a user data set: the callable is imported and called as
with whichever of ``path``, ``seed`` and ``test_fraction`` it declares and must return
:class:`DatasetSplits` or :class:`FederatedDataset`.

Default paths are relative to the current directory (``../shared/data/...``, the layout of the
project checkout), so users with full downloads pass their own ``path`` and use the same code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedguard import plugins
from fedguard.data import medmnist, synthetic, tabular
from fedguard.data.dataset import DatasetSplits, FederatedDataset
from fedguard.data.errors import DataError

BUILTIN_NAMES = ("pneumoniamnist", "breast_cancer", "synthetic", "fsdd")
DEFAULT_PATHS = {
    "pneumoniamnist": Path("../shared/data/medmnist/pneumoniamnist.npz"),
    "fsdd": Path("../shared/data/fsdd"),
}
SYNTHETIC_SAMPLES = 10_000
SYNTHETIC_INPUT_SHAPE = (1, 28, 28)
SYNTHETIC_CLASSES = 10

T = TypeVar("T")


def load_dataset(
    name: str,
    *,
    path: str | None,
    seed: int,
    test_fraction: float,
    synthetic_samples: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    synthetic_on_demand: bool = False,
    augment_copies: int = 0,
    validation: bool = False,
    feature_norm: str = "utterance",
    audio: Mapping[str, Any] | None = None,
) -> DatasetSplits | FederatedDataset:
    """Load the data set called ``name``.

    ``path`` overrides the default location of file-backed data sets; ``seed`` fixes every random
    split or draw; ``test_fraction`` is the held-out share for data sets without an official test
    split (``breast_cancer``) and, for ``synthetic``, the test size as a fraction of
    ``synthetic_samples`` (at least one sample). ``synthetic_samples``, ``input_shape`` and
    ``num_classes`` configure ``synthetic`` only and default to 10,000 samples of shape
    ``(1, 28, 28)`` in 10 classes; ``synthetic_on_demand`` makes its training features when
    clients read them instead of holding them (:mod:`fedguard.data.synthetic`). ``augment_copies`` adds speed/pitch-perturbed copies of
    each training recording (``fsdd`` only). ``validation`` asks data sets without an official
    validation split (``fsdd``) to hold one out of their training data. ``feature_norm``
    (``fsdd`` only) is ``"utterance"`` or ``"band"`` (see ``fedguard.data.audio_features``).
    ``audio`` (``fsdd`` only) holds further feature settings passed to
    :func:`fedguard.data.fsdd.load_fsdd` (``trim_db``, ``dynamic_range_db``).
    """
    if augment_copies and name != "fsdd":
        raise DataError(
            f"augment_copies is an option of the fsdd audio data set, not of {name!r}: "
            "use client.augment for training-time augmentation."
        )
    if synthetic_on_demand and name != "synthetic":
        raise DataError(
            f"synthetic_on_demand is an option of the synthetic data set, not of {name!r}: a "
            "data function can return an OnDemandDataset (fedguard.data.dataset) instead."
        )
    if (feature_norm != "utterance" or audio) and name != "fsdd":
        raise DataError(
            f"feature_norm and the audio feature settings are options of the fsdd audio data set, "
            f"not of {name!r}."
        )
    if name == "pneumoniamnist":
        with _reading(name, _path(name, path)):
            return medmnist.load_medmnist(_path(name, path))
    if name == "breast_cancer":
        return tabular.load_breast_cancer(test_fraction=test_fraction, seed=seed)
    if name == "synthetic":
        num_samples = _or(synthetic_samples, SYNTHETIC_SAMPLES)
        return synthetic.make_synthetic(
            num_samples=num_samples,
            input_shape=tuple(_or(input_shape, SYNTHETIC_INPUT_SHAPE)),
            num_classes=_or(num_classes, SYNTHETIC_CLASSES),
            seed=seed,
            test_samples=max(1, round(num_samples * test_fraction)),
            on_demand=synthetic_on_demand,
        )
    if name == "fsdd":
        with _reading(name, _path(name, path)):
            return _load_fsdd(
                _path(name, path), seed, augment_copies, validation, feature_norm, audio or {}
            )

    if ":" in name:
        return _load_custom(name, path=path, seed=seed, test_fraction=test_fraction)
    raise DataError(
        f"Unknown data set {name!r}: use one of {', '.join(BUILTIN_NAMES)} "
        "or 'package.module:callable'."
    )


@contextlib.contextmanager
def _reading(name: str, path: Path) -> Iterator[None]:
    """Turn a file that cannot be read (cut short, not an archive, unreadable) into a
    :class:`DataError` naming the data set and the file, instead of a traceback."""
    try:
        yield
    except DataError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"The {name} data at {path} cannot be read ({reason}).") from None


def _or(value: T | None, default: T) -> T:
    """``value``, or ``default`` when ``value`` is None (0 and () stay, to be refused downstream)."""
    return default if value is None else value


def _path(name: str, path: str | None) -> Path:
    """The given ``path``, or the built-in data set's default location."""
    return DEFAULT_PATHS[name] if path is None else Path(path)


def _load_fsdd(
    path: Path,
    seed: int,
    augment_copies: int,
    validation: bool = False,
    feature_norm: str = "utterance",
    audio: Mapping[str, Any] | None = None,
) -> DatasetSplits:
    """The Free Spoken Digit Dataset, through ``fedguard.data.fsdd`` when that module exists."""
    if importlib.util.find_spec("fedguard.data.fsdd") is None:
        raise DataError(
            "The fsdd data set needs the module fedguard.data.fsdd, which is not installed."
        )
    fsdd = importlib.import_module("fedguard.data.fsdd")
    return fsdd.load_fsdd(
        path=str(path),
        seed=seed,
        augment_copies=augment_copies,
        validation=validation,
        normalisation=feature_norm,
        **(audio or {}),
    )


def _load_custom(
    name: str, *, path: str | None, seed: int, test_fraction: float
) -> DatasetSplits | FederatedDataset:
    """Import ``package.module:callable`` and call it with the arguments it declares.

    It may take any of ``path``, ``seed`` and ``test_fraction`` and must return
    :class:`DatasetSplits` (pooled, partitioned by fedguard) or :class:`FederatedDataset`.
    """
    try:
        loader = plugins.import_callable(name, what="Data set")
    except plugins.PluginError as exc:
        raise DataError(str(exc)) from exc
    result = plugins.call_with_supported(loader, path=path, seed=seed, test_fraction=test_fraction)
    if not isinstance(result, DatasetSplits | FederatedDataset):
        raise DataError(
            f"Data set {name!r} returned {type(result).__name__}, expected DatasetSplits or "
            "FederatedDataset."
        )
    return result
