"""Voice activity: the batched detector equals the silero-vad package; regions and windows follow the rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from slimwhisper.audio import SAMPLE_RATE
from slimwhisper.engine.vad import (
    FRAME,
    VADOptions,
    audible_regions,
    pack_windows,
    speech_probabilities,
    speech_regions,
    speech_windows,
    split_long,
)

CLIP = SHARED_DATA / "realspeech" / "en" / "en_lj_LJ001-0001.flac"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package loads TorchScript
@pytest.mark.skipif(not CLIP.is_file(), reason=f"{CLIP} not found")
def test_probabilities_equal_the_packages_streaming_model():
    """Our one-pass run of the network gives the package's frame-by-frame probabilities."""
    silero_vad = pytest.importorskip("silero_vad")
    threads = torch.get_num_threads()
    try:
        model = silero_vad.load_silero_vad()  # importing the package sets torch to one thread
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.01 * rng.standard_normal(t.size))
    import soundfile as sf

    audio = np.concatenate([audio, sf.read(CLIP, dtype="float32")[0][: SAMPLE_RATE * 4]])
    audio = audio.astype(np.float32)[: len(audio) - 100]  # a partial last frame
    ref = []
    with torch.no_grad():
        for start in range(0, len(audio), FRAME):
            chunk = torch.from_numpy(audio[start : start + FRAME])
            ref.append(model(torch.nn.functional.pad(chunk, (0, FRAME - len(chunk))), SAMPLE_RATE).item())
    ours = speech_probabilities(audio)
    assert ours.shape == (len(ref),)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert ours.max() > 0.5  # the test audio does hold speech-like frames, so the comparison means something


def frames_to_s(n: int) -> float:
    return n * FRAME / SAMPLE_RATE


def test_regions_use_hysteresis_drop_blips_and_merge_padding():
    probs = np.zeros(200)
    probs[10:40] = 0.9
    probs[40:42] = 0.4  # between the thresholds: still speech
    probs[42:60] = 0.9
    probs[100:103] = 0.9  # a 96-ms blip: dropped
    probs[150:190] = 0.8
    opts = VADOptions(pad_s=0.0)
    n = 200 * FRAME
    assert speech_regions(probs, n, opts) == [(10 * FRAME, 60 * FRAME), (150 * FRAME, 190 * FRAME)]
    probs[60:62] = 0.2  # a dip below the exit threshold shorter than min_silence (0.1 s = 3 frames)
    probs[62:66] = 0.9
    assert speech_regions(probs, n, opts)[0] == (10 * FRAME, 66 * FRAME)
    padded = speech_regions(probs, n, VADOptions(pad_s=frames_to_s(50)))
    assert padded == [(0, n)]  # padding joins the regions and stays inside the audio


def test_long_speech_is_cut_at_its_quietest_frame_and_windows_never_exceed_30_s():
    rng = np.random.default_rng(1)
    probs = 0.7 + 0.2 * rng.random(3000)
    probs[700] = 0.55  # the quietest frame in the second half of the first 30 s (937 frames)
    max_len = 30 * SAMPLE_RATE
    probs[100] = 0.5  # quieter, but in the first half: cutting there would leave a needlessly short piece
    pieces = split_long((0, 3000 * FRAME), probs, max_len)
    assert pieces[0] == (0, 700 * FRAME)
    assert all(b - a <= max_len for a, b in pieces) and pieces[-1][1] == 3000 * FRAME
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))  # contiguous: nothing lost
    regions = [(0, 5 * SAMPLE_RATE), (8 * SAMPLE_RATE, 20 * SAMPLE_RATE), (29 * SAMPLE_RATE, 40 * SAMPLE_RATE)]
    assert pack_windows(regions, np.zeros(3000), max_len) == [(0, 20 * SAMPLE_RATE), (29 * SAMPLE_RATE,
                                                                                      40 * SAMPLE_RATE)]


def test_silence_has_no_windows():
    assert speech_windows(np.zeros(5 * SAMPLE_RATE, dtype=np.float32)) == []
    rng = np.random.default_rng(2)
    assert speech_windows((1e-4 * rng.standard_normal(5 * SAMPLE_RATE)).astype(np.float32)) == []


@pytest.mark.skipif(not CLIP.is_file(), reason=f"{CLIP} not found")
def test_speech_between_silences_is_found_with_its_edges():
    import soundfile as sf

    speech = sf.read(CLIP, dtype="float32")[0]
    gap = np.zeros(10 * SAMPLE_RATE, dtype=np.float32)
    windows = speech_windows(np.concatenate([gap, speech, gap]))
    assert len(windows) == 1
    start, end = windows[0]
    assert 9.0 * SAMPLE_RATE < start < 10.2 * SAMPLE_RATE
    assert 9.6 * SAMPLE_RATE < end - 10 * SAMPLE_RATE < 10.2 * SAMPLE_RATE  # the clip lasts 9.66 s


def test_audible_regions_find_sound_above_the_floor_only():
    """A -40 dBFS tone between silences is found frame-exactly; hiss at -80 dBFS and digital silence are not."""
    audio = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    t = np.arange(10 * FRAME) / SAMPLE_RATE
    audio[20 * FRAME : 30 * FRAME] = 0.0141 * np.sin(2 * np.pi * 440 * t)  # RMS 0.01 = -40 dBFS
    assert audible_regions(audio) == [(20 * FRAME, 30 * FRAME)]
    hiss = np.random.default_rng(0).normal(0, 1e-4, len(audio)).astype(np.float32)
    assert audible_regions(hiss) == [] and audible_regions(np.zeros(100, np.float32)) == []
    assert audible_regions(hiss + audio) == [(20 * FRAME, 30 * FRAME)]
    tail = np.concatenate([np.zeros(FRAME), np.full(100, 0.5)]).astype(np.float32)  # a partial last frame
    assert audible_regions(tail) == [(FRAME, FRAME + 100)]
    assert audible_regions(hiss, floor_dbfs=-90) == [(0, len(hiss))]
