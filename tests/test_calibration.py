"""Calibration sources: bundled clips, files, plain folders, dataset layouts, arrays; clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from slimwhisper.assets import calibration_clips, demo_clips
from slimwhisper.calibration import calibration_audio, feature_batches
from slimwhisper.errors import SlimWhisperError


def test_default_is_the_bundled_calibration_set():
    windows = calibration_audio(None)
    assert len(windows) == len(calibration_clips()) >= 30
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) > 16_000 for w in windows)
    assert len(calibration_audio(None, limit=3)) == 3


def test_plain_folder_file_and_manifest(tmp_path):
    for clip in demo_clips()[:2]:
        shutil.copy(clip["audio"], tmp_path)
    assert len(calibration_audio(tmp_path)) == 2  # no transcripts needed
    assert len(calibration_audio(next(tmp_path.glob("*.flac")))) == 1
    manifest = tmp_path / "sub" / "manifest.jsonl"
    manifest.parent.mkdir()
    sf.write(manifest.parent / "a.wav", np.zeros(16_000 * 65, np.float32) + 0.01, 16_000)  # 65 s
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav", "text": "x"}) + "\n")
    assert len(calibration_audio(manifest)) == 3  # every 30-s window of a long recording counts


def test_arrays_and_feature_batches():
    windows = calibration_audio([np.ones(8000, np.float32) * 0.1] * 3)
    batches = list(feature_batches(windows, num_mel_bins=80, batch_size=2))
    assert [b.shape for b in batches] == [(2, 80, 3000), (1, 80, 3000)]


def test_missing_or_empty_source_is_an_error(tmp_path):
    with pytest.raises(SlimWhisperError):
        calibration_audio(tmp_path / "nothing-here")
    with pytest.raises(SlimWhisperError):
        calibration_audio(tmp_path)  # an empty folder
