"""engine/formats.py: SRT and WebVTT rendering."""
from __future__ import annotations

from slimwhisper.engine.formats import to_srt, to_vtt
from slimwhisper.engine.transcriber import Segment


def test_srt_and_vtt():
    segs = [Segment(0.0, 1.5, " Hello."), Segment(3661.25, 3662.0, " World")]
    assert to_srt(segs) == "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nWorld\n"
    assert to_vtt(segs).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n")
