"""Voice activity: where a recording has speech, and how to cut it into Whisper windows at silences.

The detector is Silero VAD v6 (MIT licence), the model faster-whisper and WhisperX rely on, with its
weights read from the `silero-vad` package. The package streams audio through the model 32 ms at a
time; here the same network runs over a whole recording in three calls: its convolutional front end
on every 32-ms frame at once (it has no state), one `nn.LSTM` over the frame sequence (the only
state), and its output layer. The probabilities equal the package's streaming ones (a test checks).
The package is located on disk, not imported, because importing it sets torch to one thread.

Speech regions follow from the per-frame probabilities with hysteresis (speech starts above
`threshold`, ends below `threshold - 0.15` after `min_silence_s`); `pack_windows` then groups
consecutive regions into windows of at most 30 s, so windows are cut in silences, never mid-word.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import CHUNK_SAMPLES, SAMPLE_RATE
from ..errors import SlimWhisperError

FRAME = 512  # samples per VAD frame (32 ms at 16 kHz)
CONTEXT = 64  # samples of the previous frame the model sees with each frame
_FILE = "silero_vad.jit"


@dataclass(frozen=True)
class VADOptions:
    """How probabilities become speech regions and windows (seconds unless named otherwise)."""

    threshold: float = 0.5  # a frame above this starts speech
    min_silence_s: float = 0.1  # speech ends after this much below threshold - 0.15
    min_speech_s: float = 0.25  # shorter regions are dropped (clicks, breaths)
    pad_s: float = 0.4  # kept around each region so onsets and word ends are not clipped
    max_window_s: float = CHUNK_SAMPLES / SAMPLE_RATE  # Whisper's window


def _weights_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise SlimWhisperError("voice activity detection needs the silero-vad package: `pip install silero-vad`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _FILE
    if not path.is_file():
        raise SlimWhisperError(f"the silero-vad package has no {_FILE}; reinstall it: `pip install -U silero-vad`")
    return path


@lru_cache(maxsize=1)
def _weights() -> dict[str, torch.Tensor]:
    """The 16-kHz network's tensors, keyed as in the package's TorchScript model."""
    with warnings.catch_warnings():  # torch deprecates TorchScript loading; the package ships no other form
        warnings.simplefilter("ignore", DeprecationWarning)
        state = torch.jit.load(str(_weights_path()), map_location="cpu").state_dict()
    return {k[len("_model."):]: v for k, v in state.items() if k.startswith("_model.")}


def _front_end(frames: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Features [N, 128] of frames [N, CONTEXT + FRAME]: STFT magnitude, then four ReLU convolutions."""
    x = F.pad(frames[:, None], (0, CONTEXT), mode="reflect")
    spec = F.conv1d(x, w["stft.forward_basis_buffer"], stride=128)
    half = spec.shape[1] // 2
    x = (spec[:, :half] ** 2 + spec[:, half:] ** 2).sqrt()
    for i, stride in enumerate((1, 2, 2, 1)):
        x = F.relu(F.conv1d(x, w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"],
                            stride=stride, padding=1))
    return x.squeeze(-1)


@torch.inference_mode()
def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """P(speech) of every 32-ms frame of 16-kHz `audio` (the last frame zero-padded)."""
    w = _weights()
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    x = F.pad(x, (CONTEXT, (-len(x)) % FRAME))  # zero context before the first frame, as the package
    features = _front_end(x.unfold(0, CONTEXT + FRAME, FRAME), w)
    lstm = torch.nn.LSTM(128, 128, batch_first=True)
    lstm.load_state_dict({"weight_ih_l0": w["decoder.rnn.weight_ih"], "weight_hh_l0": w["decoder.rnn.weight_hh"],
                          "bias_ih_l0": w["decoder.rnn.bias_ih"], "bias_hh_l0": w["decoder.rnn.bias_hh"]})
    hidden = F.relu(lstm(features[None])[0][0])
    out = hidden @ w["decoder.decoder.2.weight"][0, :, 0] + w["decoder.decoder.2.bias"]
    return torch.sigmoid(out).numpy()


def speech_regions(probs: np.ndarray, n_samples: int, options: VADOptions = VADOptions()) -> list[tuple[int, int]]:
    """Speech as [start, end) sample ranges: hysteresis on `probs`, short regions dropped, then padded and merged."""
    frame_s = FRAME / SAMPLE_RATE
    min_silence = max(1, round(options.min_silence_s / frame_s))
    regions, start, quiet = [], None, 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= options.threshold:
                start, quiet = i, 0
        elif p < options.threshold - 0.15:
            quiet += 1
            if quiet >= min_silence:
                regions.append((start, i - quiet + 1))
                start = None
        else:
            quiet = 0
    if start is not None:
        regions.append((start, len(probs)))
    pad = round(options.pad_s * SAMPLE_RATE)
    out: list[tuple[int, int]] = []
    for a, b in regions:
        if (b - a) * frame_s < options.min_speech_s:
            continue
        a, b = max(0, a * FRAME - pad), min(n_samples, b * FRAME + pad)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def split_long(region: tuple[int, int], probs: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Cut a region longer than `max_len` samples at its least speech-like frames (searched in the second
    half of each window, so no piece is needlessly short)."""
    pieces, (start, end) = [], region
    while end - start > max_len:
        lo, hi = (start + max_len // 2) // FRAME, (start + max_len) // FRAME
        cut = (lo + int(np.argmin(probs[lo:hi]))) * FRAME if hi > lo else start + max_len
        cut = min(max(cut, start + FRAME), start + max_len)
        pieces.append((start, cut))
        start = cut
    return pieces + [(start, end)]


def pack_windows(regions: list[tuple[int, int]], probs: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Group consecutive speech regions into windows spanning at most `max_len` samples."""
    windows: list[tuple[int, int]] = []
    for region in regions:
        for a, b in split_long(region, probs, max_len):
            if windows and b - windows[-1][0] <= max_len:
                windows[-1] = (windows[-1][0], b)
            else:
                windows.append((a, b))
    return windows


def find_speech(audio: np.ndarray, options: VADOptions = VADOptions()
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Speech regions of `audio` (unpadded) and the ≤30-s windows that pack them (padded regions), both as
    [start, end) sample ranges."""
    probs = speech_probabilities(audio)
    padded = speech_regions(probs, len(audio), options)
    tight = speech_regions(probs, len(audio), replace(options, pad_s=0.0))
    return tight, pack_windows(padded, probs, round(options.max_window_s * SAMPLE_RATE))


def speech_windows(audio: np.ndarray, options: VADOptions = VADOptions()) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most one Whisper window each, covering the speech of `audio`."""
    return find_speech(audio, options)[1]


def overlap(regions: list[tuple[int, int]], start: int, end: int) -> int:
    """Samples of `regions` inside [start, end)."""
    return sum(max(0, min(b, end) - max(a, start)) for a, b in regions)


SILENCE_DBFS = -60.0  # a 32-ms frame quieter than this (RMS, full scale = 1) carries no audible sound


def audible_regions(audio: np.ndarray, floor_dbfs: float = SILENCE_DBFS) -> list[tuple[int, int]]:
    """[start, end) sample ranges of the 32-ms frames louder than `floor_dbfs`: the energy check used
    when the detector is off.

    Whisper writes text on digital silence ("you", "Thank you."); without the detector the engine still
    never shows it a window with nothing audible in it. The floor is far below any speech, so it only
    removes silence and never a quiet word.
    """
    n = len(audio) // FRAME * FRAME
    frames = np.asarray(audio[:n], dtype=np.float64).reshape(-1, FRAME)
    loud = np.sqrt(np.mean(frames**2, axis=1)) > 10 ** (floor_dbfs / 20) if n else np.zeros(0, bool)
    if len(audio) > n:  # the last partial frame counts too
        loud = np.append(loud, np.sqrt(np.mean(np.asarray(audio[n:], np.float64) ** 2)) > 10 ** (floor_dbfs / 20))
    edges = np.flatnonzero(np.diff(np.concatenate(([0], loud.astype(np.int8), [0]))))
    return [(int(a) * FRAME, min(int(b) * FRAME, len(audio))) for a, b in zip(edges[::2], edges[1::2])]
