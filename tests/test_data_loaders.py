"""Loaders: real MedMNIST and breast cancer numbers, synthetic data, and the name registry."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO as REPO_ROOT
from conftest import SHARED_DATA
from fedguard.data import medmnist, registry, synthetic, tabular
from fedguard.data.dataset import DatasetSplits
from fedguard.data.errors import DataError

PNEUMONIA = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _medmnist_arrays(images_shape: tuple[int, ...], labels: np.ndarray) -> dict[str, np.ndarray]:
    """A tiny MedMNIST-layout archive: the same images and labels in all three splits."""
    images = np.arange(np.prod(images_shape), dtype=np.int64).reshape(images_shape) % 256
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    return arrays


# --- MedMNIST -----------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_pneumoniamnist_real_file() -> None:
    data = medmnist.load_medmnist(PNEUMONIA)
    assert data.name == "pneumoniamnist"
    assert (len(data.train), len(data.val), len(data.test)) == (2428, 270, 468)
    assert data.num_classes == 2
    assert data.input_shape == (1, 28, 28)
    for part in (data.train, data.val, data.test):
        assert part.x.dtype == np.float32 and part.y.dtype == np.int64
        assert part.y.ndim == 1
        assert float(part.x.min()) == 0.0 and float(part.x.max()) <= 1.0
    assert float(data.train.x.max()) == 1.0
    # The bundled subset is class-balanced.
    assert np.bincount(data.train.y).tolist() == [1214, 1214]
    assert np.bincount(data.test.y).tolist() == [234, 234]


@pytest.mark.shared_data
def test_registry_default_path_is_relative_to_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    data = registry.load_dataset("pneumoniamnist", path=None, seed=0, test_fraction=0.2)
    assert len(data.train) == 2428
    by_path = registry.load_dataset(
        "pneumoniamnist", path=str(PNEUMONIA), seed=0, test_fraction=0.2
    )
    np.testing.assert_array_equal(by_path.test.x, data.test.x)


def test_medmnist_rgb_is_channels_first(tmp_path: Path) -> None:
    labels = np.array([[0], [2], [1], [2]], dtype=np.uint8)
    arrays = _medmnist_arrays((4, 8, 8, 3), labels)
    data = medmnist.load_medmnist(_write_npz(tmp_path / "bloodmnist.npz", **arrays))
    assert data.name == "bloodmnist"
    assert data.input_shape == (3, 8, 8)
    assert data.num_classes == 3
    assert data.train.y.tolist() == [0, 2, 1, 2]
    raw = arrays["train_images"]
    assert data.train.x[1, 2, 5, 6] == np.float32(raw[1, 5, 6, 2]) / np.float32(255)


def test_medmnist_refuses_multilabel(tmp_path: Path) -> None:
    arrays = _medmnist_arrays((3, 28, 28), np.zeros((3, 14), dtype=np.uint8))
    with pytest.raises(DataError, match="only single-label 2D files are supported"):
        medmnist.load_medmnist(_write_npz(tmp_path / "chestmnist.npz", **arrays))


def test_medmnist_missing_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        medmnist.load_medmnist(tmp_path / "nothere.npz")
    arrays = _medmnist_arrays((3, 28, 28), np.zeros((3, 1), dtype=np.uint8))
    del arrays["val_labels"]
    with pytest.raises(DataError, match="lacks the key\\(s\\) val_labels"):
        medmnist.load_medmnist(_write_npz(tmp_path / "partial.npz", **arrays))


# --- breast cancer ------------------------------------------------------------------------------


def test_breast_cancer_split_and_standardisation() -> None:
    data = tabular.load_breast_cancer(test_fraction=0.25, seed=3)
    assert (len(data.train), len(data.test)) == (426, 143)  # 569 samples, test rounded up
    assert data.val is None
    assert data.num_classes == 2
    assert data.class_names == ("malignant", "benign")
    assert data.input_shape == (30,)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    np.testing.assert_allclose(data.train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.train.x.std(axis=0), 1.0, atol=1e-4)
    # Stratified: 212 malignant / 357 benign overall, kept in both splits.
    assert np.bincount(data.train.y).tolist() == [159, 267]
    assert np.bincount(data.test.y).tolist() == [53, 90]
    again = tabular.load_breast_cancer(test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again.test.x, data.test.x)
    other = tabular.load_breast_cancer(test_fraction=0.25, seed=4)
    assert not np.array_equal(other.test.x, data.test.x)


def test_breast_cancer_rejects_bad_fraction() -> None:
    with pytest.raises(DataError, match="test_fraction"):
        tabular.load_breast_cancer(test_fraction=1.0, seed=0)


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_shapes_balance_and_determinism() -> None:
    data = synthetic.make_synthetic(
        num_samples=2000, input_shape=(1, 28, 28), num_classes=10, seed=7, test_samples=500
    )
    assert data.input_shape == (1, 28, 28)
    assert (len(data.train), len(data.test)) == (2000, 500)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    assert np.bincount(data.train.y).tolist() == [200] * 10
    assert np.bincount(data.test.y).tolist() == [50] * 10
    again = synthetic.make_synthetic(
        num_samples=2000, input_shape=(1, 28, 28), num_classes=10, seed=7, test_samples=500
    )
    np.testing.assert_array_equal(again.train.x, data.train.x)
    np.testing.assert_array_equal(again.test.y, data.test.y)
    # The test set does not depend on the number of training samples.
    smaller = synthetic.make_synthetic(
        num_samples=300, input_shape=(1, 28, 28), num_classes=10, seed=7, test_samples=500
    )
    np.testing.assert_array_equal(smaller.test.x, data.test.x)


def test_synthetic_is_learnable() -> None:
    """Nearest class mean, fitted on train, classifies the test set almost perfectly."""
    data = synthetic.make_synthetic(
        num_samples=1000, input_shape=(20,), num_classes=5, seed=1, test_samples=500
    )
    means = np.stack([data.train.x[data.train.y == c].mean(axis=0) for c in range(5)])
    distances = ((data.test.x[:, None, :] - means[None]) ** 2).sum(axis=-1)
    assert (distances.argmin(axis=1) == data.test.y).mean() > 0.95


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="num_classes must be at least 2"):
        synthetic.make_synthetic(num_samples=10, input_shape=(4,), num_classes=1, seed=0)
    with pytest.raises(DataError, match="input_shape"):
        synthetic.make_synthetic(num_samples=10, input_shape=(), num_classes=2, seed=0)


# --- registry -----------------------------------------------------------------------------------


def test_registry_builtins() -> None:
    cancer = registry.load_dataset("breast_cancer", path=None, seed=0, test_fraction=0.2)
    assert len(cancer.train) + len(cancer.test) == 569
    assert len(cancer.test) == 114
    synth = registry.load_dataset(
        "synthetic",
        path=None,
        seed=0,
        test_fraction=0.2,
        synthetic_samples=500,
        input_shape=(3, 4, 4),
        num_classes=4,
    )
    assert (len(synth.train), len(synth.test), synth.input_shape) == (500, 100, (3, 4, 4))
    assert synth.num_classes == 4


def test_registry_unknown_name_lists_builtins() -> None:
    with pytest.raises(DataError, match="pneumoniamnist, breast_cancer, synthetic, fsdd"):
        registry.load_dataset("cifar10", path=None, seed=0, test_fraction=0.2)


def test_registry_fsdd_without_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An install without the audio module (fedguard.data.fsdd, which needs librosa) gets a
    DataError that names it, before any file is read; the module is hidden from the finder."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    asked: list[str] = []

    def find_spec(name: str, *args: object, **kwargs: object):  # noqa: ANN202
        asked.append(name)
        return None if name == "fedguard.data.fsdd" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=r"needs the module fedguard\.data\.fsdd"):
        registry.load_dataset("fsdd", path=str(tmp_path), seed=0, test_fraction=0.2)
    assert "fedguard.data.fsdd" in asked


def test_registry_custom_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_fg_data.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from fedguard.data.dataset import ArrayDataset, DatasetSplits

            def load(*, path, seed, test_fraction):
                x = np.full((4, 2), seed, dtype=np.float32)
                part = ArrayDataset(x, np.array([0, 1, 0, 1]))
                return DatasetSplits(name=str(path), train=part, test=part, num_classes=2)

            def bad(*, path, seed, test_fraction):
                return {"x": 1}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        data = registry.load_dataset("my_fg_data:load", path="here", seed=5, test_fraction=0.2)
        assert isinstance(data, DatasetSplits)
        assert data.name == "here" and float(data.train.x[0, 0]) == 5.0
        with pytest.raises(DataError, match="returned dict, expected DatasetSplits"):
            registry.load_dataset("my_fg_data:bad", path=None, seed=0, test_fraction=0.2)
        with pytest.raises(DataError, match="has no callable named 'missing'"):
            registry.load_dataset("my_fg_data:missing", path=None, seed=0, test_fraction=0.2)
        with pytest.raises(DataError, match="cannot import 'no_such_fg_module'"):
            registry.load_dataset("no_such_fg_module:load", path=None, seed=0, test_fraction=0.2)
    finally:
        sys.modules.pop("my_fg_data", None)


def test_registry_custom_callable_may_return_federated_data_and_take_no_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_fg_sites.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from fedguard.data.dataset import ArrayDataset, FederatedDataset

            def sites():
                part = ArrayDataset(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]))
                return FederatedDataset({"a": part, "b": part}, part, num_classes=2)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        data = registry.load_dataset("my_fg_sites:sites", path=None, seed=0, test_fraction=0.2)
        assert list(data.clients) == ["a", "b"]
    finally:
        sys.modules.pop("my_fg_sites", None)
