"""Log-mel features of short utterances, and the offline speed/pitch augmentation that feeds them.

Every utterance is first fitted to a fixed duration (centred: zero-padded on both sides, or the
middle kept), so all feature maps have the same frame count. The features are

    P = |STFT(w)|^2                        (Hann window n_fft samples, hop, center=True, zero pad)
    M = B P                                (B: n_mels Slaney mel filters over 0 .. sample_rate / 2)
    D = 10 log10(max(M, amin))             (dB, floor amin = 1e-10)
    D = max(D, max(D) - top_db)            (per utterance: at most top_db = 80 dB of dynamic range)
    X = (D - mean(D)) / max(std(D), eps)   (per utterance, over the whole spectrogram)

and, as an option (:func:`normalise_bands`), every mel band of X is then brought to zero mean and
unit variance over the utterance's frames (cepstral mean and variance normalisation applied to
log-mel bands), which removes a voice's or a microphone's fixed spectral envelope.

With the defaults (25 ms window, 10 ms hop, 1 s) at 8 kHz: n_fft = 200, hop = 80, 8,000 samples
and ``1 + 8000 // 80 = 101`` frames, so one utterance is ``float32`` ``[1, 40, 101]``.

librosa is imported lazily by its own loader: a cached data set never pays its import cost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import librosa
import numpy as np

SPEED_RANGE = (0.9, 1.1)
PITCH_SEMITONES = 2.0
PITCH_N_FFT = 512  # phase-vocoder window of the pitch shift: 64 ms at 8 kHz
STD_FLOOR = 1e-6
DYNAMIC_RANGE_DB = 80.0  # dB kept below each utterance's peak
TRIM_DB = None  # trim leading/trailing frames this many dB below the peak (None: keep them)
BAND_STD_FLOOR = 1e-3  # a band flat at the dB floor becomes zeros, not amplified rounding noise


class Normalisation(enum.StrEnum):
    """How each utterance's log-mel features are normalised."""

    UTTERANCE = "utterance"  # zero mean, unit variance over the whole spectrogram
    BAND = "band"  # then zero mean, unit variance of each mel band over the frames


BATCH = 256


@dataclass(frozen=True)
class LogMelSettings:
    """Feature settings; window, hop and duration are in seconds and scale with the sample rate."""

    sample_rate: int = 8000
    n_mels: int = 40
    window_s: float = 0.025
    hop_s: float = 0.010
    duration_s: float = 1.0
    amin: float = 1e-10
    top_db: float = DYNAMIC_RANGE_DB
    trim_db: float | None = TRIM_DB

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"The sample rate must be positive, got {self.sample_rate}.")
        if not self.top_db > 0:
            raise ValueError(f"The dynamic range top_db must be positive, got {self.top_db}.")
        if self.trim_db is not None and not self.trim_db > 0:
            raise ValueError(
                f"trim_db must be positive (or None: no trimming), got {self.trim_db}."
            )
        if min(self.window_s, self.hop_s, self.duration_s) <= 0 or self.n_mels <= 0:
            raise ValueError("n_mels, window_s, hop_s and duration_s must all be positive.")

    @property
    def n_fft(self) -> int:
        """Window (and FFT) length in samples: 200 for 25 ms at 8 kHz."""
        return round(self.window_s * self.sample_rate)

    @property
    def hop_length(self) -> int:
        """Hop in samples: 80 for 10 ms at 8 kHz."""
        return round(self.hop_s * self.sample_rate)

    @property
    def num_samples(self) -> int:
        """Fixed utterance length in samples: 8,000 for 1 s at 8 kHz."""
        return round(self.duration_s * self.sample_rate)

    @property
    def num_frames(self) -> int:
        """STFT frames with ``center=True``: ``1 + num_samples // hop_length`` (101 by default)."""
        return 1 + self.num_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one utterance's features: ``(1, n_mels, num_frames)``."""
        return (1, self.n_mels, self.num_frames)


def trim_silence(wave: np.ndarray, settings: LogMelSettings) -> np.ndarray:
    """``wave`` without its leading and trailing frames quieter than ``trim_db`` below its peak.

    librosa's ``effects.trim`` over the feature window and hop. Recordings start and end with
    different amounts of room noise or digital silence; trimming before centring puts every word
    in the middle of the 1 s window, so the position and the padding no longer tell one voice or
    microphone from another. A wave with nothing above the threshold is returned whole.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if settings.trim_db is None or wave.size == 0:
        return wave
    trimmed, _ = librosa.effects.trim(
        wave, top_db=settings.trim_db, frame_length=settings.n_fft, hop_length=settings.hop_length
    )
    return trimmed if trimmed.size else wave


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """A copy of ``wave`` of exactly ``num_samples``: centred, zero-padded or its middle kept."""
    wave = np.asarray(wave, dtype=np.float32)
    excess = wave.shape[0] - num_samples
    if excess >= 0:
        return wave[excess // 2 : excess // 2 + num_samples].copy()
    out = np.zeros(num_samples, dtype=np.float32)
    start = -excess // 2
    out[start : start + wave.shape[0]] = wave
    return out


def log_mel(waves: np.ndarray, settings: LogMelSettings) -> np.ndarray:
    """Normalised log-mel features ``[N, 1, n_mels, num_frames]`` of ``waves`` ``[N, num_samples]``.

    Computed in batches of 256 utterances through librosa's multichannel STFT.
    """
    waves = np.asarray(waves, dtype=np.float32)
    if waves.ndim != 2 or waves.shape[1] != settings.num_samples:
        raise ValueError(
            f"log_mel expects waves of shape [N, {settings.num_samples}], got {waves.shape}."
        )
    out = np.empty((waves.shape[0], *settings.shape), dtype=np.float32)
    for start in range(0, waves.shape[0], BATCH):
        power = librosa.feature.melspectrogram(
            y=waves[start : start + BATCH],
            sr=settings.sample_rate,
            n_fft=settings.n_fft,
            hop_length=settings.hop_length,
            win_length=settings.n_fft,
            window="hann",
            center=True,
            pad_mode="constant",
            power=2.0,
            n_mels=settings.n_mels,
        )
        out[start : start + BATCH, 0] = _normalise(_decibels(power, settings))
    return out


def _decibels(power: np.ndarray, settings: LogMelSettings) -> np.ndarray:
    """``10 log10(max(power, amin))``, clipped to ``top_db`` below each utterance's peak."""
    db = 10.0 * np.log10(np.maximum(power, settings.amin))
    peak = db.max(axis=(1, 2), keepdims=True)
    return np.maximum(db, peak - settings.top_db)


def _normalise(db: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance; a constant spectrogram becomes all zeros."""
    mean = db.mean(axis=(1, 2), keepdims=True)
    std = db.std(axis=(1, 2), keepdims=True)
    return (db - mean) / np.maximum(std, STD_FLOOR)


def normalise_bands(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance of every mel band over the frames of each utterance.

    ``x`` is ``[..., n_mels, frames]``. A speaker's vocal tract and a room's microphone add a
    roughly constant offset per band to the log spectrum; subtracting each band's mean removes it
    (the log-mel form of cepstral mean normalisation), so a model trained on five voices meets a
    sixth with less of a shift. Measured on FSDD, each speaker held out in turn (central training
    on the other five, 6 epochs, one seed): it helped three voices (george 0.472 -> 0.584, lucas
    0.558 -> 0.578, nicolas 0.506 -> 0.542) and hurt three (jackson 0.652 -> 0.616, theo 0.900 ->
    0.816, yweweler 0.790 -> 0.720): mean 0.646 -> 0.643, so it is an option, not the default.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return (x - mean) / np.maximum(std, BAND_STD_FLOOR)


def perturb(wave: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One randomly perturbed copy of ``wave``: a speed change, then a pitch shift.

    The speed factor ``s ~ U(0.9, 1.1)`` resamples the wave to ``len / s`` samples (tempo and pitch
    both change, as in Kaldi's speed perturbation); the pitch shift ``n ~ U(-2, 2)`` semitones keeps
    the tempo (librosa's phase vocoder and resampling). No random gain: the per-utterance
    normalisation of :func:`log_mel` would remove it.
    """
    speed = rng.uniform(*SPEED_RANGE)
    semitones = rng.uniform(-PITCH_SEMITONES, PITCH_SEMITONES)
    wave = np.asarray(wave, dtype=np.float32)
    fast = librosa.resample(wave, orig_sr=sample_rate, target_sr=round(sample_rate / speed))
    shifted = librosa.effects.pitch_shift(
        fast, sr=sample_rate, n_steps=semitones, n_fft=PITCH_N_FFT, hop_length=PITCH_N_FFT // 4
    )
    return shifted.astype(np.float32)
