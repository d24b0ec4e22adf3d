"""Writing transcripts: plain text, JSON, SubRip (SRT) and WebVTT."""
from __future__ import annotations

import json

FORMATS = ("txt", "json", "srt", "vtt")


def timestamp(seconds: float, decimal: str = ".", always_hours: bool = True) -> str:
    """HH:MM:SS.mmm (SRT uses a comma as the decimal mark)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    head = f"{hours:02d}:" if always_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(segments) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def to_vtt(segments) -> str:
    blocks = [f"{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_json(result) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False, indent=2)


def render(result, fmt: str) -> str:
    """`result` (a `Transcription`) as text in format `fmt` (one of FORMATS)."""
    if fmt == "txt":
        return result.text + "\n"
    if fmt == "json":
        return to_json(result) + "\n"
    if fmt == "srt":
        return to_srt(result.segments)
    if fmt == "vtt":
        return to_vtt(result.segments)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
