"""The Free Spoken Digit Dataset, or any folder of WAV files in its layout, as :class:`DatasetSplits`.

Layout: ``{label}_{speaker}_{take}.wav`` (``7_george_12.wav``) in the given folder or in its
``recordings/`` subfolder, with an optional ``speakers.json`` (speaker -> metadata) beside the
recordings or one level up. A user's own recordings in this layout load through the same code.

- Split (the official one): takes 0-4 of every speaker and label are the test set, the rest train.
- ``groups`` is the speaker name, in train and test alike: the natural partition gives one client
  (household) per speaker, sorted by name, and per-speaker test accuracy needs no other table.
- Labels are the integer ``label``; ``num_classes`` is the largest label plus one (10 for FSDD),
  ``class_names`` are ``"0"``, ``"1"``, ...
- Features: :func:`fedguard.data.audio_features.log_mel`, ``float32`` ``[N, 1, 40, 101]`` at
  8 kHz (40 mel bands, 25 ms window = 200 samples, 10 ms hop = 80 samples, every utterance centred
  in 1 s = 8,000 samples, log-mel normalised per utterance).
- Skipped files, each logged as a warning that names the file and the reason, and counted in
  ``info["skipped"]``: ``bad_name`` (not ``{int}_{speaker}_{int}.wav``), ``empty`` (zero bytes or
  zero frames), ``unreadable`` (libsndfile cannot decode it, or NaN/inf samples) and
  ``wrong_sample_rate`` (not ``sample_rate``; nothing is resampled). Multi-channel files are
  averaged to mono and counted in ``info["downmixed"]``. Files not ending in ``.wav`` are ignored.
- The features are computed once and cached in ``cache_dir`` as one ``.npz`` keyed by a SHA-256 of
  every ``.wav`` file's name, size and modification time, the feature and augmentation settings
  and the librosa version; any change to the folder computes them anew.

Reference: Z. Jackson et al., Free Spoken Digit Dataset,
https://github.com/Jakobovski/free-spoken-digit-dataset (CC BY-SA 4.0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import time
import uuid
import zipfile
import zlib
from collections import Counter
from enum import StrEnum
from pathlib import Path

import numpy as np
import soundfile

from fedguard.data import audio_features
from fedguard.data.dataset import ArrayDataset, DatasetSplits
from fedguard.data.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("../shared/data/fsdd")
DEFAULT_CACHE_DIR = Path(".fedguard-cache/fsdd")
TEST_TAKES = 5
VALIDATION_TAKES = 10  # takes 5-9 form the validation split when one is asked for
CACHE_VERSION = 1
NAME_PATTERN = re.compile(r"(\d+)_(.+)_(\d+)")


class Skip(StrEnum):
    """Why a ``.wav`` file was left out."""

    BAD_NAME = "bad_name"
    EMPTY = "empty"
    UNREADABLE = "unreadable"
    WRONG_SAMPLE_RATE = "wrong_sample_rate"


@dataclasses.dataclass(frozen=True)
class _Features:
    """What the cache holds: one row per used file, then per augmented copy, and the skips."""

    x: np.ndarray  # float32 [M, 1, n_mels, frames]
    labels: np.ndarray  # int64 [M]
    speakers: np.ndarray  # str [M]
    takes: np.ndarray  # int64 [M]
    augmented: np.ndarray  # bool [M]
    skipped_files: np.ndarray  # str [S]
    skipped_reasons: np.ndarray  # str [S], Skip values
    skipped_details: np.ndarray  # str [S]
    downmixed: int


class _Skipped(Exception):
    def __init__(self, reason: Skip, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def load_fsdd(
    path: str | Path = DEFAULT_PATH,
    seed: int = 0,
    *,
    sample_rate: int = 8000,
    augment_copies: int = 0,
    validation: bool = False,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    normalisation: str = "utterance",
    trim_db: float | None = audio_features.TRIM_DB,
    dynamic_range_db: float = audio_features.DYNAMIC_RANGE_DB,
) -> DatasetSplits:
    """Load FSDD (or recordings in its layout) from ``path`` with log-mel features.

    ``sample_rate`` is the rate every file must have (others are skipped, not resampled).
    ``augment_copies`` adds that many randomly speed- and pitch-perturbed copies of every training
    utterance (:func:`fedguard.data.audio_features.perturb`; same label and speaker, train only,
    after the originals), drawn from ``seed`` and the file name; ``seed`` affects nothing else.
    ``validation`` holds out takes 5-9 of every speaker (and their perturbed copies) from training
    as a validation split, for choosing settings without touching the official test takes.
    ``cache_dir`` holds the feature cache (relative to the current directory by default); ``None``
    computes the features without reading or writing a cache. ``normalisation = "band"``
    normalises every mel band per utterance on top of the cached per-utterance features
    (:func:`fedguard.data.audio_features.normalise_bands`; the cache is the same for both).
    ``trim_db`` trims each recording's leading and trailing frames quieter than that many dB below
    its peak before centring (None: no trimming); ``dynamic_range_db`` is the range of the log-mel
    features below each utterance's peak (:class:`fedguard.data.audio_features.LogMelSettings`).
    """
    try:
        norm = audio_features.Normalisation(normalisation)
    except ValueError:
        allowed = ", ".join(repr(n.value) for n in audio_features.Normalisation)
        raise DataError(f"normalisation must be one of {allowed}, got {normalisation!r}.") from None
    if not isinstance(augment_copies, int) or augment_copies < 0:
        raise DataError(f"augment_copies must be a non-negative integer, got {augment_copies!r}.")
    if augment_copies and seed < 0:
        raise DataError(f"The augmentation seed must be non-negative, got {seed}.")
    if sample_rate <= 0:
        raise DataError(f"The sample rate must be positive, got {sample_rate}.")
    try:
        settings = audio_features.LogMelSettings(
            sample_rate=sample_rate, top_db=dynamic_range_db, trim_db=trim_db
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None
    folder = _recordings_folder(Path(path))
    files = _wav_files(folder)
    key = _cache_key(files, settings, augment_copies, seed)
    cache_file = None if cache_dir is None else Path(cache_dir) / f"fsdd-{key}.npz"
    features = None if cache_file is None else _read_cache(cache_file)
    state = "off" if cache_file is None else "hit" if features is not None else "miss"
    if features is None:
        started = time.perf_counter()
        features = _featurise(folder, files, settings, augment_copies, seed)
        log.info(
            "FSDD: featurised %d files from %s in %.1f s.",
            len(files),
            folder,
            time.perf_counter() - started,
        )
        if cache_file is not None and len(features.labels):
            _write_cache(cache_file, features)
    for name, reason, detail in zip(
        features.skipped_files, features.skipped_reasons, features.skipped_details, strict=True
    ):
        log.warning("FSDD: skipped %s (%s): %s", folder / str(name), reason, detail)
    info: dict[str, object] = {
        "cache": state,
        "cache_file": None if cache_file is None else str(cache_file),
        "normalisation": str(norm),
    }
    if norm is audio_features.Normalisation.BAND:
        features = dataclasses.replace(features, x=audio_features.normalise_bands(features.x))
    return _splits(folder, len(files), features, settings, info, validation)


def _recordings_folder(path: Path) -> Path:
    """``path/recordings`` when that folder exists, else ``path`` itself."""
    if not path.is_dir():
        raise DataError(f"FSDD folder {path} does not exist or is not a folder.")
    nested = path / "recordings"
    return nested if nested.is_dir() else path


def _wav_files(folder: Path) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of every ``*.wav`` file in ``folder``, sorted by name."""
    files = []
    for entry in folder.iterdir():
        if entry.suffix.lower() == ".wav" and entry.is_file():
            stat = entry.stat()
            files.append((entry.name, stat.st_size, stat.st_mtime_ns))
    if not files:
        raise DataError(f"FSDD folder {folder} has no .wav files.")
    return sorted(files)


def _cache_key(
    files: list[tuple[str, int, int]],
    settings: audio_features.LogMelSettings,
    augment_copies: int,
    seed: int,
) -> str:
    """Hex digest of everything the cached arrays depend on."""
    augment = None
    if augment_copies:
        augment = {
            "copies": augment_copies,
            "seed": seed,
            "speed": audio_features.SPEED_RANGE,
            "semitones": audio_features.PITCH_SEMITONES,
            "pitch_n_fft": audio_features.PITCH_N_FFT,
        }
    payload = {
        "version": CACHE_VERSION,
        "librosa": importlib.metadata.version("librosa"),
        "features": dataclasses.asdict(settings),
        "augment": augment,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _featurise(
    folder: Path,
    files: list[tuple[str, int, int]],
    settings: audio_features.LogMelSettings,
    augment_copies: int,
    seed: int,
) -> _Features:
    """Decode, check and featurise every file (originals first, then augmented copies)."""
    rows: list[tuple[str, int, str, int]] = []
    waves: list[np.ndarray] = []
    skipped: list[tuple[str, Skip, str]] = []
    downmixed = 0
    for name, size, _ in files:
        try:
            label, speaker, take = _parse_name(name)
            wave, channels = _read_wave(folder / name, size, settings.sample_rate)
        except _Skipped as skip:
            skipped.append((name, skip.reason, skip.detail))
            continue
        downmixed += channels > 1
        rows.append((name, label, speaker, take))
        waves.append(wave)
    train = [(row, wave) for row, wave in zip(rows, waves, strict=True) if row[3] >= TEST_TAKES]
    copies = [
        audio_features.perturb(
            wave,
            settings.sample_rate,
            np.random.default_rng([seed, copy, zlib.crc32(row[0].encode())]),
        )
        for copy in range(augment_copies)
        for row, wave in train
    ]
    fitted = np.zeros((len(waves) + len(copies), settings.num_samples), dtype=np.float32)
    for i, wave in enumerate(waves + copies):
        fitted[i] = audio_features.fit_length(
            audio_features.trim_silence(wave, settings), settings.num_samples
        )
    rows += [row for _ in range(augment_copies) for row, _ in train]
    return _Features(
        x=audio_features.log_mel(fitted, settings),
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        speakers=np.array([r[2] for r in rows], dtype=str),
        takes=np.array([r[3] for r in rows], dtype=np.int64),
        augmented=np.arange(len(rows)) >= len(waves),
        skipped_files=np.array([s[0] for s in skipped], dtype=str),
        skipped_reasons=np.array([s[1].value for s in skipped], dtype=str),
        skipped_details=np.array([s[2] for s in skipped], dtype=str),
        downmixed=int(downmixed),
    )


def _parse_name(name: str) -> tuple[int, str, int]:
    """``"7_george_12.wav"`` -> ``(7, "george", 12)``."""
    match = NAME_PATTERN.fullmatch(Path(name).stem)
    if match is None:
        raise _Skipped(Skip.BAD_NAME, "the name is not {label}_{speaker}_{take}.wav")
    return int(match.group(1)), match.group(2), int(match.group(3))


def _read_wave(file: Path, size: int, sample_rate: int) -> tuple[np.ndarray, int]:
    """The file's samples as ``float32`` mono (channels averaged) and its channel count."""
    if size == 0:
        raise _Skipped(Skip.EMPTY, "the file has zero bytes")
    try:
        data, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _Skipped(Skip.UNREADABLE, f"cannot be decoded ({exc})") from exc
    if rate != sample_rate:
        raise _Skipped(Skip.WRONG_SAMPLE_RATE, f"{rate} Hz, expected {sample_rate} Hz")
    if data.shape[0] == 0:
        raise _Skipped(Skip.EMPTY, "the file has no audio frames")
    if not np.isfinite(data).all():
        raise _Skipped(Skip.UNREADABLE, "the samples contain NaN or infinity")
    return data.mean(axis=1, dtype=np.float32), data.shape[1]


def _read_cache(file: Path) -> _Features | None:
    """The cached features, or None when the file is absent or unreadable (then recomputed)."""
    if not file.is_file():
        return None
    fields = [f.name for f in dataclasses.fields(_Features)]
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in fields}
        for reason in arrays["skipped_reasons"]:
            Skip(str(reason))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("FSDD: cache file %s is unreadable (%s); recomputing the features.", file, exc)
        return None
    arrays["downmixed"] = int(arrays["downmixed"])
    return _Features(**arrays)


def _write_cache(file: Path, features: _Features) -> None:
    """Write ``features`` to ``file`` atomically; a failure only costs the next load its speed."""
    arrays = {f.name: getattr(features, f.name) for f in dataclasses.fields(_Features)}
    temporary = file.with_name(f"{file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, file)
    except OSError as exc:
        log.warning("FSDD: cannot write the cache file %s (%s); features not cached.", file, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()


def _splits(
    folder: Path,
    files_total: int,
    features: _Features,
    settings: audio_features.LogMelSettings,
    info: dict[str, object],
    validation: bool = False,
) -> DatasetSplits:
    """Official split (plus a validation split if asked), speaker groups and the data summary."""
    f = features
    skipped = {reason.value: 0 for reason in Skip}
    skipped.update(Counter(str(r) for r in f.skipped_reasons))
    if not len(f.labels):
        raise DataError(
            f"FSDD folder {folder} has no usable recordings: all {files_total} .wav files were "
            f"skipped ({', '.join(f'{k}: {v}' for k, v in skipped.items() if v)})."
        )
    is_test = ~f.augmented & (f.takes < TEST_TAKES)
    for part, rows in (("training", ~is_test), ("test", is_test)):
        if not rows.any():
            raise DataError(
                f"FSDD folder {folder} has no {part} recordings: takes 0-{TEST_TAKES - 1} are "
                f"the test set, takes {TEST_TAKES} and above the training set."
            )
    in_val = (f.takes >= TEST_TAKES) & (f.takes < VALIDATION_TAKES) if validation else None
    is_train = ~is_test if in_val is None else ~is_test & ~in_val
    train = ArrayDataset(f.x[is_train], f.labels[is_train], f.speakers[is_train])
    test = ArrayDataset(f.x[is_test], f.labels[is_test], f.speakers[is_test])
    val = None
    if in_val is not None:
        is_val = in_val & ~f.augmented
        if not is_val.any() or not is_train.any():
            raise DataError(
                f"FSDD folder {folder}: a validation split needs takes {TEST_TAKES}-"
                f"{VALIDATION_TAKES - 1} and takes {VALIDATION_TAKES} and above."
            )
        val = ArrayDataset(f.x[is_val], f.labels[is_val], f.speakers[is_val])
    num_classes = int(f.labels.max()) + 1
    info = {
        "source": str(folder),
        "files_total": files_total,
        "files_used": int((~f.augmented).sum()),
        "skipped": skipped,
        "downmixed": f.downmixed,
        "augmented_train": int(f.augmented.sum()),
        "speakers": _speakers(folder, f, is_test),
        "features": {
            "kind": "log-mel",
            **dataclasses.asdict(settings),
            "n_fft": settings.n_fft,
            "hop_length": settings.hop_length,
            "num_samples": settings.num_samples,
            "num_frames": settings.num_frames,
        },
        **info,
    }
    return DatasetSplits(
        name="fsdd",
        train=train,
        test=test,
        val=val,
        num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)),
        info=info,
    )


def _speakers(folder: Path, f: _Features, is_test: np.ndarray) -> dict[str, dict[str, object]]:
    """Per speaker: original train and test counts, plus its ``speakers.json`` entry if any."""
    metadata = _speaker_metadata(folder)
    out: dict[str, dict[str, object]] = {}
    for speaker in sorted(set(f.speakers.tolist())):
        mine = (f.speakers == speaker) & ~f.augmented
        entry = metadata.get(speaker)
        out[speaker] = {
            **(entry if isinstance(entry, dict) else {}),
            "train": int((mine & ~is_test).sum()),
            "test": int((mine & is_test).sum()),
        }
    return out


def _speaker_metadata(folder: Path) -> dict[str, object]:
    """``speakers.json`` beside the recordings or one level up, or ``{}``."""
    for candidate in (folder / "speakers.json", folder.parent / "speakers.json"):
        if candidate.is_file():
            try:
                metadata = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("FSDD: ignoring unreadable speaker metadata %s (%s).", candidate, exc)
                return {}
            return metadata if isinstance(metadata, dict) else {}
    return {}
