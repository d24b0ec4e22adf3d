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


def test_frame_weights_give_the_audio_its_share_of_every_padded_window():
    from slimwhisper.lowrank.calibrate import frame_weights

    w = frame_weights([100, 1500, 1], 0.8, frames=1500)
    assert w.shape == (3, 1500) and torch.all(w[0, :100] == 1) and torch.all(w[1] == 1) and w[2, 0] == 1
    for row, n in ((w[0], 100), (w[2], 1)):
        assert float(row[:n].sum() / row.sum()) == pytest.approx(0.8)
        assert torch.all(row[n:] == row[n])  # the padding shares its part evenly
    assert torch.all(frame_weights([7], 1.0, frames=20)[0, 7:] == 0)  # audio only
    assert frame_weights([7], None) is None


def test_weighted_sums_equal_the_sums_of_weighted_rows():
    from slimwhisper.lowrank.calibrate import LinearStats

    y = torch.randn(2, 5, 3)
    w = torch.tensor([[1.0, 2.0, 0.0, 0.5, 1.0], [3.0, 1.0, 1.0, 0.0, 0.25]])
    s = LinearStats.zeros(3)
    s.add(y, w)
    rows, weights = y.reshape(-1, 3).double(), w.reshape(-1).double()
    torch.testing.assert_close(s.total, (weights[:, None] * rows).sum(0))
    torch.testing.assert_close(s.gram, rows.T @ (weights[:, None] * rows))
    assert s.rows == pytest.approx(float(weights.sum()))
    repeated = LinearStats.zeros(3)  # a whole weight is the same row counted that many times
    repeated.add(torch.cat([y[0, :1], y[0, 1:2], y[0, 1:2]]))
    partial = LinearStats.zeros(3)
    partial.add(y[:1, :2], w[:1, :2])
    torch.testing.assert_close(partial.gram, repeated.gram)
    assert partial.rows == repeated.rows == 3


def test_each_window_is_weighted_by_its_own_audio():
    import numpy as np

    from slimwhisper.lowrank.calibrate import audio_frames, weighted_batches

    sr = 16_000
    clips = [np.zeros(2 * sr, np.float32), np.zeros(40 * sr, np.float32), np.zeros(sr // 2, np.float32)]
    batches = list(weighted_batches(clips, 80, 2, 0.8))  # windows of 2 s, 30 s, 10 s, 0.5 s
    assert [f.shape[0] for f, _ in batches] == [2, 2]
    # the frames weighing 1 are each window's audio
    assert [int((w == 1).sum()) for _, weights in batches for w in weights] == [
        audio_frames(2 * sr), 1500, audio_frames(10 * sr), audio_frames(sr // 2)]
    assert audio_frames(10 * sr) == 500 + 25 and audio_frames(40 * sr) == 1500
    assert all(weights is None for _, weights in weighted_batches(clips[:1], 80, 2, None))


def test_statistics_weighted_otherwise_are_refused(tiny_model):
    stats = calibrate(tiny_model, calib_audio(), LowRankConfig(audio_weight=None), progress=False)
    assert stats.extra["audio_weight"] == "None"
    with pytest.raises(SlimWhisperError, match="--audio-weight None"):
        sw.convert(tiny_model, LowRankConfig(granule=8), calibration=stats)
    sw.convert(tiny_model, LowRankConfig(granule=8, audio_weight=None), calibration=stats)
    weighted = calibrate(tiny_model, calib_audio(), LowRankConfig(), progress=False)
    for name, s in stats.layers.items():  # the calibration clips are short: the weighting moves the statistics
        assert not torch.allclose(weighted.layers[name].covariance(), s.covariance()), name


def test_audio_given_as_a_path_is_recorded_for_finetune_to_validate_on(tiny_model, tmp_path):
    from conftest import write_clips
    from slimwhisper.info import describe

    manifest = write_clips(tmp_path / "cal", n=2)
    cfg = LowRankConfig(theta_attn=0.6, theta_mlp=0.7, granule=8)
    converted = sw.convert(tiny_model, cfg, calibration=str(manifest), progress=False)
    assert converted.config.compression["lowrank"]["calibration"] == str(manifest.resolve())
    assert describe(converted.config)["lowrank"]["calibration"] == str(manifest.resolve())  # `info` shows it
    in_memory = sw.convert(tiny_model, cfg, calibration=calib_audio(), progress=False)
    assert "calibration" not in in_memory.config.compression["lowrank"]
