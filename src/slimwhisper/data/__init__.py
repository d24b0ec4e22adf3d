"""The data layer evaluation, calibration and training share.

`open_dataset(path)` reads a LibriSpeech tree, a JSONL manifest, a Common Voice folder, a saved Hugging Face
dataset or a folder of audio with a CSV into a `Dataset` of typed `Sample`s; `iter_audio` decodes them to
16 kHz mono with an explicit policy for clips over 30 s. Nothing is dropped silently: skips are reported by id.
"""
from __future__ import annotations

from .readers import check_audio_file, detect_layout, open_dataset
from .records import Dataset, Sample, Skipped, SkipReport, normalize_language
from .stream import LONG_POLICIES, iter_audio, load_sample_audio

__all__ = [
    "LONG_POLICIES",
    "Dataset",
    "Sample",
    "SkipReport",
    "Skipped",
    "check_audio_file",
    "detect_layout",
    "iter_audio",
    "load_sample_audio",
    "normalize_language",
    "open_dataset",
]
