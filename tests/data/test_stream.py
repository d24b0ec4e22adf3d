"""data/stream.py: the 30-s policies and skipping while streaming audio."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_tone
from slimwhisper.data import Sample, SkipReport, iter_audio, load_sample_audio
from slimwhisper.errors import AudioError, SlimWhisperError


def test_long_clip_policies_are_explicit(tmp_path: Path) -> None:
    long = Sample("long", write_tone(tmp_path / "long.flac", seconds=31.0), "t", "en", 31.0)
    short = Sample("short", write_tone(tmp_path / "short.flac", seconds=1.0), "t", "en", 1.0)
    assert len(load_sample_audio(long, on_long="keep")) == 31 * 16_000
    assert len(load_sample_audio(long, on_long="truncate")) == 30 * 16_000
    assert load_sample_audio(long, on_long="skip") is None
    with pytest.raises(AudioError, match="longer than 30 s"):
        load_sample_audio(long, on_long="error")
    with pytest.raises(SlimWhisperError, match="long-audio policy"):
        load_sample_audio(short, on_long="cut")  # type: ignore[arg-type]
    report = SkipReport()
    gone = Sample("gone", tmp_path / "gone.flac", "t")
    got = list(iter_audio([long, gone, short], report=report, on_long="skip"))
    assert [s.id for s, _ in got] == ["short"]
    assert report.by_reason() == {"missing": 1, "too long": 1}
    with pytest.raises(AudioError):
        list(iter_audio([gone], report=SkipReport(), on_error="raise"))
