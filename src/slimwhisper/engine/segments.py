"""Results (`Segment`, `Transcription`) and how a window's tokens become segments.

Whisper marks segments with timestamp tokens, `<|t|>` for t = 0.00, 0.02, ... 30.00 s from the window
start: a segment is `<|start|> text <|end|>`, and consecutive segments touch (`<|end|><|start|>`).

Two readings of a window's tokens:
- `window_segments` (sequential long-form, the rule of openai-whisper and transformers): complete
  segments are kept; text after the last closed segment was cut by the window's end and is dropped,
  and the next window starts at that segment's end. A window whose tokens end with a lone timestamp
  (`text <|end|>`) saw no speech after it, so the next window starts where this one ends.
- `parse_segments` (independent windows, batched mode): every word is kept, since no later window
  will see this audio again; text after the last timestamp runs to the window's end.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

SECONDS_PER_TIMESTAMP = 0.02  # one timestamp token step
FRAMES_PER_TIMESTAMP = 2  # log-mel frames (10 ms each) per timestamp step


@dataclass
class Segment:
    """A piece of a transcript with its time span in seconds from the start of the recording."""

    start: float
    end: float
    text: str


@dataclass
class Transcription:
    """One recording's transcript: the text, its segments, the language and the audio's duration."""

    text: str
    segments: list[Segment]
    language: str | None
    duration: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WindowSegments:
    """What one sequential window produced: segments as (start, end, tokens) in timestamp steps from the
    window start, how many log-mel frames to advance, and the tokens to condition the next window on."""

    segments: list[tuple[int, int, list[int]]] = field(default_factory=list)
    advance: int = 0
    history: list[int] = field(default_factory=list)


def compression_ratio(text: str) -> float:
    """Raw / zlib-compressed byte length: high for repetitive (looping) output."""
    raw = text.encode("utf-8")
    return len(raw) / max(1, len(zlib.compress(raw))) if raw else 0.0


def window_segments(tokens: list[int], ts_begin: int, window_frames: int) -> WindowSegments:
    """Split a window's generated tokens (EOT excluded) at consecutive timestamps, the long-form way.

    `window_frames` is the window's length in log-mel frames (at most 3000); the advance is a whole
    window when nothing was closed or the tokens end with a lone timestamp, else the last closed end.
    """
    is_ts = [t >= ts_begin for t in tokens]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    lone_end = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    if not cuts:
        stamps = [t - ts_begin for t in tokens if t >= ts_begin]
        end = stamps[-1] if stamps and stamps[-1] > 0 else window_frames // FRAMES_PER_TIMESTAMP
        return WindowSegments([(0, end, list(tokens))], window_frames, list(tokens))
    if lone_end:
        cuts.append(len(tokens))
    out, last = WindowSegments(), 0
    for cut in cuts:
        piece = tokens[last:cut]
        out.segments.append((piece[0] - ts_begin, piece[-1] - ts_begin, piece))
        out.history += piece
        last = cut
    out.advance = window_frames if lone_end else (tokens[last - 1] - ts_begin) * FRAMES_PER_TIMESTAMP
    return out


def parse_segments(tokens: list[int], ts_begin: int | None, offset: float, end: float,
                   decode: Callable[[list[int]], str]) -> list[Segment]:
    """Segments of an independent window (every word kept): text between timestamp pairs, text after the
    last timestamp up to `end`, or one segment from `offset` to `end` when there are no timestamps."""
    if ts_begin is None or not any(t >= ts_begin for t in tokens):
        text = decode([t for t in tokens if ts_begin is None or t < ts_begin])
        return [Segment(offset, end, text)] if text.strip() else []
    segments, start, text = [], None, []
    for t in tokens:
        if t < ts_begin:
            text.append(t)
            continue
        time = offset + (t - ts_begin) * SECONDS_PER_TIMESTAMP
        if start is not None and text:
            segments.append(Segment(start, time, decode(text)))
            start, text = None, []
        else:
            start = time
    if text:
        segments.append(Segment(start if start is not None else offset, end, decode(text)))
    return [s for s in segments if s.text.strip()]
