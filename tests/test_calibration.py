"""Calibration sources: bundled clips, files, plain folders, dataset layouts, arrays; clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from slimwhisper.assets import calibration_clips, demo_clips
from slimwhisper.audio import load_audio
from slimwhisper.calibration import calibration_audio, feature_batches
from slimwhisper.errors import SlimWhisperError


def test_default_is_the_bundled_calibration_set():
    windows = calibration_audio(None)
    assert len(windows) == len(calibration_clips()) >= 30
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) > 16_000 for w in windows)
    # each clip, shorter than 30 s, is one window: the clip as load_audio reads it
    first = calibration_audio(None, limit=3)
    assert len(first) == 3
    assert all(np.array_equal(w, load_audio(c["audio"])) for w, c in zip(first, calibration_clips()[:3]))


def test_plain_folder_file_and_manifest(tmp_path):
    for clip in demo_clips()[:2]:
        shutil.copy(clip["audio"], tmp_path)
    files = sorted(tmp_path.glob("*.flac"))
    folder = calibration_audio(tmp_path)  # no transcripts needed
    assert len(folder) == 2 and all(np.array_equal(w, load_audio(f)) for w, f in zip(folder, files))
    (single,) = calibration_audio(files[0])
    assert np.array_equal(single, load_audio(files[0]))
    manifest = tmp_path / "sub" / "manifest.jsonl"
    manifest.parent.mkdir()
    sf.write(manifest.parent / "a.wav", np.zeros(16_000 * 65, np.float32) + 0.01, 16_000)  # 65 s
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav", "text": "x"}) + "\n")
    # every 30-s window of a long recording counts: 30 s, 30 s and the last 5 s
    assert [len(w) for w in calibration_audio(manifest)] == [30 * 16_000, 30 * 16_000, 5 * 16_000]


def test_arrays_and_feature_batches():
    windows = calibration_audio([np.ones(8000, np.float32) * level for level in (0.1, 0.2, 0.3)])
    batches = list(feature_batches(windows, num_mel_bins=80, batch_size=2))
    assert [b.shape for b in batches] == [(2, 80, 3000), (1, 80, 3000)]
    # in input order, each window's log-mel exactly as Whisper's feature extractor gives it alone
    extractor = WhisperFeatureExtractor(feature_size=80)
    alone = [extractor(w, sampling_rate=16_000, return_tensors="pt").input_features for w in windows]
    torch.testing.assert_close(torch.cat(batches), torch.cat(alone))


def test_missing_or_empty_source_is_an_error(tmp_path):
    with pytest.raises(SlimWhisperError):
        calibration_audio(tmp_path / "nothing-here")
    with pytest.raises(SlimWhisperError):
        calibration_audio(tmp_path)  # an empty folder
