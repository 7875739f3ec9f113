"""FSDD loader: the real recordings (split, speakers, features, cache) and folders with bad files."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

import fedguard
from fedguard.data import audio_features, fsdd, partition, registry
from fedguard.data.dataset import DatasetSplits
from fedguard.data.errors import DataError

FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd"
RECORDINGS = FSDD / "recordings"
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
SHAPE = (1, 40, 101)
LOGGER = "fedguard.data.fsdd"

# Features of the same recordings computed in differently composed batches (librosa's batched
# STFT and mel product) may differ in float32 rounding, by up to about 1e-6 (more threads, other
# batch splits); a repeated identical computation and a cache hit are compared exactly.
REBATCHED_ATOL = 1e-5


@dataclass(frozen=True)
class FullLoad:
    data: DatasetSplits
    cwd: Path  # a directory whose .fedguard-cache/fsdd holds the cache


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> FullLoad:
    """The 3,000 real recordings, featurised once per test session into a temporary cache."""
    cwd = tmp_path_factory.mktemp("fsdd-cwd")
    data = fsdd.load_fsdd(path=FSDD, seed=0, cache_dir=cwd / ".fedguard-cache" / "fsdd")
    return FullLoad(data, cwd)


@pytest.fixture
def no_features(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make decoding a recording or computing a feature fail, so that a load must come from the
    cache; returns the cache files the loads read, in order."""

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("recordings were decoded or featurised instead of read from the cache")

    monkeypatch.setattr(audio_features, "log_mel", fail)
    monkeypatch.setattr(fsdd, "_featurise", fail)
    monkeypatch.setattr(fsdd.soundfile, "read", fail)
    read: list[Path] = []
    real_read_cache = fsdd._read_cache

    def read_cache(file: Path):  # noqa: ANN202
        features = real_read_cache(file)
        if features is not None:
            read.append(Path(file))
        return features

    monkeypatch.setattr(fsdd, "_read_cache", read_cache)
    return read


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """20 real recordings (2 speakers x 5 digits x takes 0 and 5) directly in a folder."""
    folder = tmp_path / "small"
    folder.mkdir()
    for speaker in ("george", "jackson"):
        for digit in range(5):
            for take in (0, 5):
                name = f"{digit}_{speaker}_{take}.wav"
                shutil.copy(RECORDINGS / name, folder / name)
    return folder


def _utterance_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))


# --- the real data set --------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_split_labels_and_speakers(full: FullLoad) -> None:
    data = full.data
    assert data.name == "fsdd"
    assert (len(data.train), len(data.test)) == (2700, 300)
    assert data.num_classes == 10
    assert data.class_names == tuple(str(d) for d in range(10))
    assert np.bincount(data.train.y).tolist() == [270] * 10
    assert np.bincount(data.test.y).tolist() == [30] * 10
    assert data.train.y.dtype == np.int64
    _, clients = partition.natural(data.train.groups)
    assert clients == SPEAKERS
    assert sorted(set(data.test.groups.tolist())) == SPEAKERS
    info = data.info
    assert (info["files_total"], info["files_used"], info["augmented_train"]) == (3000, 3000, 0)
    assert set(info["skipped"].values()) == {0}
    assert info["speakers"]["george"]["train"] == 450
    assert info["speakers"]["george"]["test"] == 50
    assert info["speakers"]["george"]["accent"] == "GRC/Greek"
    assert info["cache"] == "miss"


@pytest.mark.shared_data
def test_real_features_shape_and_normalisation(full: FullLoad) -> None:
    assert full.data.input_shape == SHAPE == audio_features.LogMelSettings().shape
    for part in (full.data.train, full.data.test):
        assert part.x.dtype == np.float32
        assert np.isfinite(part.x).all()
        mean, std = _utterance_stats(part.x)
        np.testing.assert_allclose(mean, 0.0, atol=1e-4)
        np.testing.assert_allclose(std, 1.0, atol=1e-3)


@pytest.mark.shared_data
def test_second_load_reads_the_cache(full: FullLoad, no_features: list[Path]) -> None:
    """The second load decodes no recording and computes no feature: it reads the one cache file
    the first load wrote, and gives the same arrays bit for bit. (Timings: benchmarks/fsdd_cache.py.)"""
    again = fsdd.load_fsdd(path=FSDD, seed=0, cache_dir=full.cwd / ".fedguard-cache" / "fsdd")
    assert again.info["cache"] == "hit"
    cache_file = Path(full.data.info["cache_file"])
    assert no_features == [cache_file] and again.info["cache_file"] == str(cache_file)
    assert list(cache_file.parent.iterdir()) == [cache_file]
    np.testing.assert_array_equal(again.train.x, full.data.train.x)
    np.testing.assert_array_equal(again.test.x, full.data.test.x)
    np.testing.assert_array_equal(again.test.groups, full.data.test.groups)


@pytest.mark.shared_data
def test_registry_loads_fsdd_with_the_default_cache_dir(
    full: FullLoad, no_features: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(full.cwd)  # the default cache folder is relative to the current directory
    data = registry.load_dataset("fsdd", path=str(FSDD), seed=0, test_fraction=0.2)
    assert (len(data.train), len(data.test)) == (2700, 300)
    assert data.info["cache"] == "hit"
    assert Path(data.info["cache_file"]).parent == Path(".fedguard-cache/fsdd")


@pytest.mark.shared_data
def test_band_normalisation_comes_from_the_same_cache(
    full: FullLoad, no_features: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(full.cwd)
    data = registry.load_dataset(
        "fsdd", path=str(FSDD), seed=0, test_fraction=0.2, feature_norm="band"
    )
    assert data.info["cache"] == "hit" and data.info["normalisation"] == "band"
    x = data.train.x
    std = x.std(axis=-1)
    live = std > 0.5  # bands flat at the dB floor are all zeros instead
    assert live.mean() > 0.9
    np.testing.assert_allclose(x.mean(axis=-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(std[live], 1.0, atol=1e-3)
    np.testing.assert_array_equal(x[~live], 0.0)
    np.testing.assert_allclose(x, audio_features.normalise_bands(full.data.train.x))


@pytest.mark.shared_data
def test_validation_split_holds_out_takes_5_to_9(full: FullLoad, no_features: list[Path]) -> None:
    data = fsdd.load_fsdd(
        path=FSDD, seed=0, validation=True, cache_dir=full.cwd / ".fedguard-cache" / "fsdd"
    )
    assert data.info["cache"] == "hit"  # the split is made after the cache
    assert full.data.val is None
    assert (len(data.train), len(data.val), len(data.test)) == (2400, 300, 300)
    assert np.bincount(data.val.y).tolist() == [30] * 10
    assert sorted(set(data.val.groups.tolist())) == SPEAKERS
    np.testing.assert_array_equal(data.test.x, full.data.test.x)
    seen = {row.tobytes() for row in full.data.train.x}
    kept = {row.tobytes() for row in data.train.x}
    held = {row.tobytes() for row in data.val.x}
    assert kept | held == seen and not kept & held


@pytest.mark.shared_data
def test_short_federated_run_recognises_spoken_digits(
    full: FullLoad, no_features: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Three rounds over the six real households: far above the 10 % that guessing gets.

    A linear model on the cached log-mel features keeps this end-to-end check to seconds (the
    example's speech CNN took minutes here; its accuracy is the examples' benchmark)."""
    monkeypatch.chdir(full.cwd)
    config = {
        "experiment": {"name": "speech", "seed": 0, "rounds": 3},
        "data": {"dataset": "fsdd", "path": str(FSDD), "partition": "natural", "num_clients": 6},
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 2},
        "server": {"strategy": "fedavgm", "server_momentum": 0.5},
        "evaluation": {"every": 3},
    }
    summary = fedguard.run(config, out=tmp_path / "run", progress=False)
    print(f"FSDD federated, 3 rounds: test accuracy {summary['test_accuracy']:.4f}")
    assert summary["test_accuracy"] >= 0.55  # measured 0.72; guessing gives 0.10
    assert set(summary["accuracy_by_group"]) == set(SPEAKERS)
    assert np.asarray(summary["confusion_matrix"]).sum() == 300


# --- folders with bad files ---------------------------------------------------------------------


@pytest.mark.shared_data
def test_bad_files_are_skipped_named_and_counted(
    small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (small / "1_george_7.wav").write_bytes(b"")
    (small / "2_george_8.wav").write_text("not audio at all")
    tone = np.sin(np.linspace(0, 400 * np.pi, 16000)).astype(np.float32)
    soundfile.write(small / "3_george_9.wav", tone, 16000, subtype="PCM_16")
    shutil.copy(small / "0_george_0.wav", small / "hello.wav")
    stereo = np.stack([tone[:8000], 0.5 * tone[:8000]], axis=1)
    soundfile.write(small / "4_jackson_9.wav", stereo, 8000, subtype="PCM_16")
    (small / "notes.txt").write_text("not a .wav file: ignored")
    expected = {
        "1_george_7.wav": "empty",
        "2_george_8.wav": "unreadable",
        "3_george_9.wav": "wrong_sample_rate",
        "hello.wav": "bad_name",
    }
    for attempt in ("miss", "hit"):  # a cached load reports the same skips
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            data = fsdd.load_fsdd(path=small, seed=0, cache_dir=tmp_path / "cache")
        assert data.info["cache"] == attempt
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == len(expected)
        for name, reason in expected.items():
            assert any(name in w and f"({reason})" in w for w in warnings), (name, warnings)
        assert data.info["files_total"] == 25
        assert data.info["files_used"] == 21
        assert data.info["skipped"] == {
            "bad_name": 1,
            "empty": 1,
            "unreadable": 1,
            "wrong_sample_rate": 1,
        }
        assert data.info["downmixed"] == 1
        assert (len(data.train), len(data.test)) == (11, 10)
        assert data.num_classes == 5
        assert data.info["speakers"]["jackson"] == {"train": 6, "test": 5}


def test_empty_or_missing_folder_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty))):
        fsdd.load_fsdd(path=empty, seed=0, cache_dir=None)
    (empty / "readme.txt").write_text("no recordings here")
    with pytest.raises(DataError, match="no .wav files"):
        fsdd.load_fsdd(path=empty, seed=0, cache_dir=None)
    with pytest.raises(DataError, match="does not exist"):
        fsdd.load_fsdd(path=tmp_path / "missing", seed=0, cache_dir=None)


def test_folder_without_usable_files_raises(tmp_path: Path) -> None:
    (tmp_path / "0_anna_0.wav").write_bytes(b"")
    (tmp_path / "hello.wav").write_text("x")
    with pytest.raises(
        DataError, match=f"{re.escape(str(tmp_path))}.*no usable recordings.*bad_name: 1"
    ):
        fsdd.load_fsdd(path=tmp_path, seed=0, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.shared_data
def test_folder_without_test_takes_raises(small: Path) -> None:
    for file in small.glob("*_0.wav"):
        file.unlink()
    with pytest.raises(DataError, match="no test recordings"):
        fsdd.load_fsdd(path=small, seed=0, cache_dir=None)


# --- the cache ----------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_cache_follows_the_folder_and_can_be_turned_off(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = fsdd.load_fsdd(path=small, seed=0, cache_dir=cache)
    assert first.info["cache"] == "miss" and len(list(cache.glob("*.npz"))) == 1
    assert fsdd.load_fsdd(path=small, seed=7, cache_dir=cache).info["cache"] == "hit"
    (small / "0_george_0.wav").unlink()
    changed = fsdd.load_fsdd(path=small, seed=0, cache_dir=cache)
    assert changed.info["cache"] == "miss" and len(changed.test) == 9
    monkeypatch.chdir(tmp_path)
    off = fsdd.load_fsdd(path=small, seed=0, cache_dir=None)
    assert off.info["cache"] == "off" and off.info["cache_file"] is None
    assert not (tmp_path / ".fedguard-cache").exists()


@pytest.mark.shared_data
def test_corrupt_cache_is_recomputed(
    small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = fsdd.load_fsdd(path=small, seed=0, cache_dir=tmp_path / "cache")
    Path(first.info["cache_file"]).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = fsdd.load_fsdd(path=small, seed=0, cache_dir=tmp_path / "cache")
    assert again.info["cache"] == "miss"
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.train.x, first.train.x)


# --- augmentation -------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_augmented_copies_are_train_only_seeded_and_cached(small: Path, tmp_path: Path) -> None:
    plain = fsdd.load_fsdd(path=small, seed=0, cache_dir=tmp_path / "cache")
    aug = fsdd.load_fsdd(path=small, seed=1, augment_copies=2, cache_dir=tmp_path / "cache")
    assert aug.info["cache"] == "miss" and aug.info["augmented_train"] == 20
    assert len(aug.train) == 30
    # featurised in a batch of 40 utterances here and of 20 there: equal up to rounding
    np.testing.assert_allclose(aug.train.x[:10], plain.train.x, rtol=0, atol=REBATCHED_ATOL)
    np.testing.assert_array_equal(aug.train.y, np.tile(plain.train.y, 3))
    np.testing.assert_array_equal(aug.train.groups, np.tile(plain.train.groups, 3))
    np.testing.assert_allclose(aug.test.x, plain.test.x, rtol=0, atol=REBATCHED_ATOL)
    assert np.abs(aug.train.x[10:20] - plain.train.x).max() > 100 * REBATCHED_ATOL
    mean, std = _utterance_stats(aug.train.x)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    same = fsdd.load_fsdd(path=small, seed=1, augment_copies=2, cache_dir=None)
    np.testing.assert_array_equal(same.train.x, aug.train.x)  # the same computation repeated
    other = fsdd.load_fsdd(path=small, seed=2, augment_copies=2, cache_dir=None)
    assert not np.array_equal(other.train.x[10:], aug.train.x[10:])
    cached = fsdd.load_fsdd(path=small, seed=1, augment_copies=2, cache_dir=tmp_path / "cache")
    assert cached.info["cache"] == "hit"
    np.testing.assert_array_equal(cached.train.x, aug.train.x)


@pytest.mark.shared_data
def test_invalid_options_raise(small: Path) -> None:
    with pytest.raises(DataError, match="augment_copies"):
        fsdd.load_fsdd(path=small, seed=0, augment_copies=-1, cache_dir=None)
    with pytest.raises(DataError, match="sample rate"):
        fsdd.load_fsdd(path=small, seed=0, sample_rate=0, cache_dir=None)
    with pytest.raises(DataError, match="normalisation must be one of 'utterance', 'band'"):
        fsdd.load_fsdd(path=small, seed=0, normalisation="global", cache_dir=None)
    with pytest.raises(DataError, match="feature_norm and the audio feature settings are options"):
        registry.load_dataset(
            "synthetic", path=None, seed=0, test_fraction=0.2, feature_norm="band"
        )


# --- feature helpers ----------------------------------------------------------------------------


def test_fit_length_centres_and_crops() -> None:
    np.testing.assert_array_equal(audio_features.fit_length(np.ones(2), 6), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(audio_features.fit_length(np.arange(7.0), 3), [2, 3, 4])


def test_log_mel_of_silence_is_zero() -> None:
    settings = audio_features.LogMelSettings()
    out = audio_features.log_mel(np.zeros((2, settings.num_samples)), settings)
    assert out.shape == (2, *SHAPE)
    assert not out.any()


def test_trim_silence_keeps_the_word_and_its_settings_are_checked() -> None:
    settings = audio_features.LogMelSettings(trim_db=30.0)
    rate = settings.sample_rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(0.2 * rate)) / rate)
    hiss = 1e-4 * np.random.default_rng(0).standard_normal(int(0.3 * rate))  # -66 dB below
    wave = np.concatenate([hiss, tone, hiss[: int(0.1 * rate)]]).astype(np.float32)
    trimmed = audio_features.trim_silence(wave, settings)
    # The 0.2 s tone survives, give or take one window at either end; the hiss goes.
    assert abs(trimmed.size - tone.size) <= 2 * settings.n_fft
    assert np.abs(trimmed).max() == pytest.approx(np.abs(tone).max(), rel=1e-6)
    off = audio_features.LogMelSettings(trim_db=None)
    np.testing.assert_array_equal(audio_features.trim_silence(wave, off), wave)
    silent = np.zeros(800, dtype=np.float32)  # nothing above the threshold: kept whole
    assert audio_features.trim_silence(silent, settings).size == 800
    for bad in ({"top_db": 0.0}, {"trim_db": -3.0}):
        with pytest.raises(ValueError, match="must be positive"):
            audio_features.LogMelSettings(**bad)


@pytest.mark.shared_data
def test_feature_settings_reach_the_cache_key_and_config_defaults_match(
    small: Path, tmp_path: Path
) -> None:
    from fedguard.experiment.config import DataSection

    assert DataSection().trim_db == audio_features.TRIM_DB
    assert DataSection().dynamic_range_db == audio_features.DYNAMIC_RANGE_DB
    plain = fsdd.load_fsdd(small, cache_dir=tmp_path, trim_db=None, dynamic_range_db=80.0)
    trimmed = fsdd.load_fsdd(small, cache_dir=tmp_path, trim_db=30.0, dynamic_range_db=40.0)
    assert plain.info["cache_file"] != trimmed.info["cache_file"]
    assert not np.array_equal(plain.train.x, trimmed.train.x)
    with pytest.raises(DataError, match="must be positive"):
        fsdd.load_fsdd(small, cache_dir=None, dynamic_range_db=-1.0)
