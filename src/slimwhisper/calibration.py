"""Calibration audio shared by every method: audio in, batches of log-mel features out.

A calibration source is a path (an audio file, a folder of audio, or any dataset layout that
`slimwhisper.data` reads), a list of paths or 16 kHz arrays, or None for the bundled calibration
clips (English speech synthesised by this project; separate from the demo clips).
Long recordings contribute every 30-s window.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .audio import load_audio, split_windows
from .errors import SlimWhisperError

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")
CalibrationSource = Union[None, str, Path, Sequence[Union[str, Path, np.ndarray]]]


def calibration_items(source: CalibrationSource, limit: int | None = None) -> list:
    """The recordings of a calibration source (paths or arrays, not yet decoded; at most `limit`)."""
    if source is None:
        from .assets import calibration_clips

        items: list = [clip["audio"] for clip in calibration_clips()]
    elif isinstance(source, (str, Path)):
        items = _paths_in(Path(source))
    else:
        items = list(source)
    return items[:limit] if limit is not None else items


def calibration_audio(source: CalibrationSource, limit: int | None = None) -> list[np.ndarray]:
    """Decode a calibration source into a list of 16 kHz mono windows (at most `limit` recordings)."""
    items = calibration_items(source, limit)
    windows: list[np.ndarray] = []
    for item in items:
        audio = item if isinstance(item, np.ndarray) else load_audio(item)
        windows.extend(split_windows(audio))
    if not windows:
        raise SlimWhisperError(f"no calibration audio found in {source}; give a folder of audio files or a manifest")
    return windows


def _paths_in(path: Path) -> list:
    """Audio named by a path: the file itself, a dataset's samples, or a plain folder's audio files.

    Calibration needs no transcripts, so a folder of audio without any dataset layout is fine.
    """
    from .data import open_dataset

    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        return [path]
    try:  # any layout the data layer reads (manifest, LibriSpeech, Common Voice, ...)
        return [sample.audio for sample in open_dataset(path)]
    except SlimWhisperError:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else []
        if not files:
            raise
        return files


def feature_batches(
    windows: Iterable[np.ndarray], num_mel_bins: int, batch_size: int = 8
) -> Iterator[torch.Tensor]:
    """Whisper log-mel features [B, n_mels, 3000] for each batch of audio windows."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    batch: list[np.ndarray] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield _features(extractor, batch)
            batch = []
    if batch:
        yield _features(extractor, batch)


def _features(extractor, batch: list[np.ndarray]) -> torch.Tensor:
    return extractor(batch, sampling_rate=16_000, return_tensors="pt").input_features
