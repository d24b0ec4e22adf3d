"""recovery/augment.py: each piece of the random recording channel does what it says, and draws are reproducible."""
from __future__ import annotations

import numpy as np
import pytest

from slimwhisper.recovery.augment import (
    SAMPLE_RATE,
    add_noise,
    band_limit,
    channel_rng,
    colored_noise,
    convolve,
    play_through_channel,
    room_response,
    set_peak,
)


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * hz * t)


def band_power(x: np.ndarray, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


def test_draws_are_a_pure_function_of_seed_step_and_clip():
    a, b = channel_rng(0, 5, 3).random(4), channel_rng(0, 5, 3).random(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, channel_rng(0, 6, 3).random(4))
    assert not np.array_equal(a, channel_rng(0, 5, 4).random(4))
    assert not np.array_equal(a, channel_rng(1, 5, 3).random(4))


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_colored_noise_has_unit_rms_and_its_slope(exponent):
    noise = colored_noise(SAMPLE_RATE * 2, exponent, np.random.default_rng(0))
    assert np.sqrt(np.mean(noise**2)) == pytest.approx(1.0, rel=1e-9)
    # power per octave: flat noise doubles per octave up, pink stays, brown halves
    low, high = band_power(noise, 500, 1000), band_power(noise, 1000, 2000)
    assert high / low == pytest.approx(2.0 ** (1 - exponent), rel=0.25)


def test_noise_is_added_at_the_asked_snr():
    speech = tone(440.0)
    noisy = add_noise(speech, 10.0, 1.0, np.random.default_rng(0))
    noise = noisy - speech
    assert 10 * np.log10(np.mean(speech**2) / np.mean(noise**2)) == pytest.approx(10.0, abs=1e-9)
    silence = np.zeros(100)
    assert np.array_equal(add_noise(silence, 10.0, 0.0, np.random.default_rng(0)), silence)


def test_room_response_is_direct_sound_then_a_decaying_tail():
    rt60 = 0.4
    h = room_response(rt60, np.random.default_rng(0))
    assert h.size == int(rt60 * SAMPLE_RATE) and h[0] == 1.0
    assert np.all(h[1 : int(0.002 * SAMPLE_RATE)] == 0.0)
    assert np.sum(h[1:] ** 2) == pytest.approx(0.25)
    tenth = h.size // 10
    early, late = np.mean(h[tenth : 2 * tenth] ** 2), np.mean(h[-tenth:] ** 2)
    assert late < early * 1e-3  # about 60 dB × 0.8 of decay between the two


def test_convolve_keeps_the_length_and_equals_direct_convolution():
    rng = np.random.default_rng(0)
    x, h = rng.standard_normal(300), rng.standard_normal(40)
    out = convolve(x, h)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, np.convolve(x, h)[:300], atol=1e-10)


def test_band_limit_removes_what_lies_above_the_cutoff():
    mix = tone(1000.0) + tone(6000.0)
    out = band_limit(mix, 3400.0)
    assert band_power(out, 5900, 6100) < 1e-12 * band_power(mix, 5900, 6100)
    assert band_power(out, 900, 1100) == pytest.approx(band_power(mix, 900, 1100), rel=1e-9)


def test_set_peak():
    out = set_peak(tone(300.0) * 0.1, -6.0)
    assert np.max(np.abs(out)) == pytest.approx(10 ** (-6 / 20))
    assert np.array_equal(set_peak(np.zeros(5), -6.0), np.zeros(5))


def test_a_channel_keeps_length_and_dtype_and_is_reproducible():
    audio = (tone(220.0, 2.0) * 0.5).astype(np.float32)
    outs = [play_through_channel(audio, channel_rng(0, 1, i)) for i in range(8)]
    assert all(o.shape == audio.shape and o.dtype == np.float32 and np.isfinite(o).all() for o in outs)
    assert all(-30.0 - 1e-3 <= 20 * np.log10(np.max(np.abs(o))) <= -1.0 + 1e-3 for o in outs)
    assert np.array_equal(outs[3], play_through_channel(audio, channel_rng(0, 1, 3)))
    assert len({o.tobytes() for o in outs}) == 8
