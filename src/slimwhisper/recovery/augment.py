"""Random recording channels for training audio: level, band limit, reverberation and background noise.

Recovery trains on whatever audio it is given, and the repository's is synthetic speech: clean, studio-level
voices. A compressed encoder distilled on such audio learns to match its original where that audio lives, and
little of that carries to real recordings (docs/recovery.md, "What synthetic audio teaches a low-rank
encoder"). Playing each training clip through a random channel (a level, a telephone-like or wide band, a
room, a noise floor) spreads the audio over more of the conditions real recordings are made in; teacher and
student hear the same altered clip, so the training stays pure distillation. On the repository's synthetic
voices it did not help a low-rank encoder (likely the voices, not the channel, are what differ), so the recipe
leaves it off. Every draw comes from a generator seeded by (run seed, step, clip), so a resumed run sees
exactly the audio an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
PEAK_DBFS = (-30.0, -1.0)  # the clip's peak level after the channel
BAND_PROBABILITY, BAND_HZ = 0.3, (3_400.0, 7_000.0)  # upper band edge: telephone to wide band
ROOM_PROBABILITY, RT60_S = 0.5, (0.15, 0.8)  # reverberation time of the simulated room
NOISE_PROBABILITY, SNR_DB = 0.7, (5.0, 35.0)
NOISE_EXPONENTS = (0.0, 1.0, 2.0)  # white, pink and brown noise: power falls as f^-exponent


def channel_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator for clip `index` of the training set at optimizer step `step`: a pure function of the three."""
    return np.random.default_rng([seed, step, index])


def colored_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """n samples of Gaussian noise whose power spectrum falls as f^-exponent, scaled to unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0  # keep DC finite; its value hardly matters
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def add_noise(audio: np.ndarray, snr_db: float, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """`audio` plus colored noise at `snr_db` below the clip's mean power."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    if power == 0.0:
        return audio
    noise = colored_noise(audio.size, exponent, rng) * np.sqrt(power / 10 ** (snr_db / 10))
    return audio + noise


def room_response(rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response: the direct sound, then Gaussian reflections decaying 60 dB in `rt60` s."""
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    tail = rng.standard_normal(t.size) * 10 ** (-3 * t / rt60)  # amplitude falls 60 dB over rt60
    tail[: int(0.002 * sample_rate)] = 0.0  # first reflections arrive a few ms after the direct sound
    tail *= 0.5 / max(float(np.sqrt(np.sum(tail**2))), 1e-12)  # reverberant energy a quarter of the direct's
    tail[0] = 1.0
    return tail


def convolve(audio: np.ndarray, response: np.ndarray) -> np.ndarray:
    """`audio` convolved with `response`, cut to the clip's length (the tail past the end is dropped)."""
    n = audio.size + response.size - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(response, size), size)
    return out[: audio.size]


def band_limit(audio: np.ndarray, cutoff_hz: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` with everything above `cutoff_hz` removed, rolled off over 300 Hz (no ringing brick wall)."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(audio.size, 1 / sample_rate)
    gain = np.clip((cutoff_hz - freqs) / 300.0 + 0.5, 0.0, 1.0)
    return np.fft.irfft(spectrum * gain, audio.size)


def set_peak(audio: np.ndarray, peak_dbfs: float) -> np.ndarray:
    """`audio` scaled so its largest sample sits at `peak_dbfs` (silence stays silence)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio if peak == 0.0 else audio * (10 ** (peak_dbfs / 20) / peak)


def play_through_channel(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`audio` (16 kHz, float) through a random channel: maybe a band limit, a room and a noise floor, then a
    random peak level. Same length and dtype as the input."""
    out = audio.astype(np.float64)
    if rng.random() < BAND_PROBABILITY:
        out = band_limit(out, rng.uniform(*BAND_HZ))
    if rng.random() < ROOM_PROBABILITY:
        out = convolve(out, room_response(rng.uniform(*RT60_S), rng))
    if rng.random() < NOISE_PROBABILITY:
        out = add_noise(out, rng.uniform(*SNR_DB), float(rng.choice(NOISE_EXPONENTS)), rng)
    return set_peak(out, rng.uniform(*PEAK_DBFS)).astype(audio.dtype)
