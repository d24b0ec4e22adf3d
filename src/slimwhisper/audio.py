"""Audio decoding: any common format and rate in, 16 kHz mono float32 out.

soundfile (libsndfile) decodes WAV/FLAC/OGG/MP3; soxr does band-limited resampling. Every failure is a
`AudioError` naming the file and saying what to do, never a bare traceback.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16_000  # Hz, what Whisper's feature extractor expects
CHUNK_SECONDS = 30  # Whisper's fixed input window
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000 samples in one window


def to_mono_16k(audio: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
    """Mix channels down (frames are rows) and resample to 16 kHz; returns float32 [n]."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise AudioError(f"{name}: expected a [samples] or [samples, channels] array, got shape {audio.shape}")
    if sample_rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE and audio.size:
        import soxr

        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if audio.size == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples); give a recording with speech in it")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples; re-export it from the original "
                         "recording")
    return audio


def load_audio(path: str | Path) -> np.ndarray:
    """Decode a file to 16 kHz mono float32 in [-1, 1].

    Raises:
        AudioError: the file is missing, cannot be decoded, or holds no samples.
    """
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path} is a folder; give the audio files in it (e.g. {path}/*.wav)")
    if not path.is_file():
        raise AudioError(f"{path}: no such file; check the path")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are plain RuntimeErrors / LibsndfileError
        raise AudioError(
            f"{path}: cannot decode audio ({exc}); convert it to WAV or FLAC, e.g. "
            f"`ffmpeg -i {path.name} -ar 16000 -ac 1 out.wav`"
        ) from exc
    return to_mono_16k(audio, rate, name=str(path))


def window_spans(n_samples: int, window: int = CHUNK_SAMPLES) -> list[tuple[int, int]]:
    """Consecutive [start, end) windows of `window` samples (the last one shorter); none for empty audio."""
    return [(start, min(start + window, n_samples)) for start in range(0, n_samples, window)]


def split_windows(audio: np.ndarray, window: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Cut audio into consecutive 30-s windows (the last one shorter)."""
    return [audio[a:b] for a, b in window_spans(len(audio), window)]
