"""Decoded audio for samples, with the 30-s window made an explicit choice.

Whisper sees 30 s at a time. A clip longer than that is a decision, never an accident: evaluation keeps it
(and decodes it long-form), training skips it (its transcript would not fit one window), calibration may
truncate it (only the activations matter). Files that fail to decode go into the skip report by id.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

from ..audio import CHUNK_SECONDS, SAMPLE_RATE, load_audio
from ..errors import AudioError, SlimWhisperError
from .records import Sample, SkipReport

LongPolicy = Literal["keep", "skip", "truncate", "error"]
LONG_POLICIES: tuple[str, ...] = ("keep", "skip", "truncate", "error")


def _too_long(seconds: float, max_seconds: float) -> bool:
    return seconds > max_seconds + 1e-6


def load_sample_audio(
    sample: Sample, *, on_long: LongPolicy = "keep", max_seconds: float = CHUNK_SECONDS
) -> np.ndarray | None:
    """16 kHz mono float32 for one sample; None when the long-clip policy says skip.

    Raises:
        AudioError: the file is missing, undecodable, empty, or too long under `on_long="error"`.
    """
    if on_long not in LONG_POLICIES:
        raise SlimWhisperError(f"unknown long-audio policy '{on_long}'; use one of {', '.join(LONG_POLICIES)}")
    if on_long == "skip" and sample.duration is not None and _too_long(sample.duration, max_seconds):
        return None  # known from the header or manifest: no need to decode
    audio = load_audio(sample.audio)
    seconds = len(audio) / SAMPLE_RATE
    if not _too_long(seconds, max_seconds) or on_long == "keep":
        return audio
    if on_long == "truncate":
        return audio[: int(max_seconds * SAMPLE_RATE)]
    if on_long == "error":
        raise AudioError(
            f"{sample.id}: {seconds:.1f} s is longer than {max_seconds:g} s; split it, or choose another "
            "long-audio policy (keep, skip, truncate)"
        )
    return None


def iter_audio(
    samples: Iterable[Sample],
    *,
    report: SkipReport,
    on_error: Literal["skip", "raise"] = "skip",
    on_long: LongPolicy = "keep",
    max_seconds: float = CHUNK_SECONDS,
) -> Iterator[tuple[Sample, np.ndarray]]:
    """Yield (sample, audio); failures and long clips the policy drops are added to `report`, never lost."""
    for sample in samples:
        try:
            audio = load_sample_audio(sample, on_long=on_long, max_seconds=max_seconds)
        except AudioError as exc:
            if on_error == "raise":
                raise
            report.add(sample.id, _reason(exc), str(exc))
            continue
        if audio is None:
            report.add(sample.id, "too long", f"{sample.audio}: longer than {max_seconds:g} s (policy: skip)")
            continue
        yield sample, audio


def _reason(exc: AudioError) -> str:
    """Short category for a loader error, so the summary can count them."""
    msg = str(exc)
    if "no such file" in msg:
        return "missing"
    if "empty" in msg:
        return "empty"
    if "longer than" in msg:
        return "too long"
    if "NaN" in msg:
        return "invalid samples"
    return "unreadable"
