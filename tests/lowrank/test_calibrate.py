"""lowrank/calibrate.py: streamed, deterministic, reusable encoder statistics."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from conftest import calib_audio, tiny_whisper
from slimwhisper.errors import SlimWhisperError
from slimwhisper.lowrank import STATS_FILE, EncoderStats, LowRankConfig, calibrate


def test_stats_streamed_deterministic_and_reusable(tiny_model, encoder_stats, tmp_path):
    more = calibrate(tiny_model, calib_audio(6), progress=False)
    for name, s in more.layers.items():  # accumulator shapes depend on the layer, not on the audio
        assert s.gram.shape == encoder_stats.layers[name].gram.shape == (s.total.numel(),) * 2
        assert s.gram.dtype == torch.float64
    assert more.windows == 6 and encoder_stats.windows == 3
    again = calibrate(tiny_model, calib_audio(), progress=False)
    cfg = LowRankConfig(theta_attn=0.6, theta_mlp=0.7, granule=8)
    r1 = sw.convert(tiny_model, cfg, calibration=encoder_stats).config.compression["lowrank"]["layers"]
    r2 = sw.convert(tiny_model, cfg, calibration=again).config.compression["lowrank"]["layers"]
    assert r1 == r2
    path = encoder_stats.save(tmp_path / STATS_FILE)
    loaded = EncoderStats.load(tmp_path)
    assert loaded.windows == 3 and loaded.fingerprint == encoder_stats.fingerprint
    r3 = sw.convert(tiny_model, cfg, calibration=str(path)).config.compression["lowrank"]["layers"]
    assert r3 == r1

    with pytest.raises(SlimWhisperError, match="another encoder"):
        sw.convert(tiny_whisper(seed=5), cfg, calibration=loaded)
