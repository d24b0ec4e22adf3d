"""Segments from a window's tokens: the long-form rule equals transformers' (and openai-whisper's)."""
from __future__ import annotations

import random

import pytest
import torch
from transformers.models.whisper.generation_whisper import WhisperGenerationMixin, _pad_to_max_length

from slimwhisper.engine.segments import compression_ratio, parse_segments, window_segments

TB = 1000  # timestamp_begin of a made-up vocabulary


def hf_window(tokens: list[int], frames: int):
    """transformers' long-form reading of one window: (start, end, tokens) per segment, the advance in
    frames, and the tokens its next window is conditioned on."""
    seq = torch.tensor(tokens)
    segments, advance = WhisperGenerationMixin._retrieve_segment(
        seek_sequence=seq, seek_outputs=[None], time_offset=torch.zeros(1, dtype=torch.float64), timestamp_begin=TB,
        seek_num_frames=torch.tensor([frames]), time_precision=0.02, time_precision_features=0.01, input_stride=2,
        prev_idx=0, idx=0, return_token_timestamps=False, decoder_input_ids=torch.zeros(1, 3, dtype=torch.long))
    history = _pad_to_max_length([segments], 0, "cpu", padding_side="left", skip_ending_double_timestamps=True,
                                 timestamp_begin=TB)[0].tolist()
    spans = [(round(float(s["start"]) / 0.02), round(float(s["end"]) / 0.02)) for s in segments]
    return spans, int(advance), history


def random_window(rng: random.Random) -> list[int]:
    """Tokens as Whisper's timestamp rules allow, ending anywhere: a first timestamp; text after a pair (or the
    first); a timestamp after a lone one; after text, text or a later timestamp."""
    tokens = [TB + rng.randrange(50)]
    for _ in range(rng.randrange(1, 30)):
        last_ts = tokens[-1] >= TB
        pair = last_ts and (len(tokens) < 2 or tokens[-2] >= TB)
        last_time = max(t for t in tokens if t >= TB) - TB
        if pair or (not last_ts and rng.random() < 0.6):
            tokens.append(rng.randrange(TB))
        elif last_ts:  # closes nothing: the segment's end is followed by the next start, same or later
            tokens.append(TB + min(1500, last_time + rng.choice([0, 0, rng.randrange(1, 40)])))
        else:
            tokens.append(TB + min(1500, last_time + rng.randrange(1, 200)))
    return tokens


@pytest.mark.parametrize("seed", range(40))
def test_window_segments_equal_transformers_long_form(seed):
    rng = random.Random(seed)
    tokens, frames = random_window(rng), rng.choice([3000, 1234])
    spans, advance, history = hf_window(tokens, frames)
    ours = window_segments(tokens, TB, frames)
    assert [(a, b) for a, b, _ in ours.segments] == spans
    assert ours.advance == advance
    assert ours.history == history


def test_window_segments_cases():
    # two closed segments, then text cut by the window's end: seek to the second segment's end
    out = window_segments([TB, 1, 2, TB + 50, TB + 50, 3, TB + 120, TB + 120, 4, 5], TB, 3000)
    assert [(a, b) for a, b, _ in out.segments] == [(0, 50), (50, 120)] and out.advance == 240
    assert out.history == [TB, 1, 2, TB + 50, TB + 50, 3, TB + 120]
    # a lone final timestamp: no speech after it, the whole window is consumed
    out = window_segments([TB, 1, TB + 50, TB + 50, 3, TB + 90], TB, 3000)
    assert out.segments[-1][:2] == (50, 90) and out.advance == 3000
    # no timestamps closed: one segment to the last timestamp (or the window's end)
    assert window_segments([TB, 7, 8], TB, 1800).segments == [(0, 900, [TB, 7, 8])]
    assert window_segments([TB + 10, 7, TB + 300], TB, 3000).segments[0][:2] == (0, 300)


def test_parse_segments_keeps_every_word_of_an_independent_window():
    segs = parse_segments([TB, 1, 2, TB + 50, TB + 50, 3, TB + 100], TB, 30.0, 60.0, lambda t: " " + "x" * len(t))
    assert [(s.start, s.end, s.text) for s in segs] == [(30.0, 31.0, " xx"), (31.0, 32.0, " x")]
    segs = parse_segments([TB, 1, 2, TB + 50, TB + 50, 3], TB, 0.0, 9.5, lambda t: "w" * len(t))
    assert (segs[-1].start, segs[-1].end, segs[-1].text) == (1.0, 9.5, "w")  # unclosed: ends with the window
    assert [s.text for s in parse_segments([5, 6], None, 2.0, 3.0, lambda t: "ab")] == ["ab"]


def test_compression_ratio_flags_loops():
    assert compression_ratio("the cat " * 40) > 2.4 > compression_ratio("A quick brown fox jumps over the lazy dog.")
    assert compression_ratio("") == 0.0
