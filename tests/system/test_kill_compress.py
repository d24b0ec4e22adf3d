"""compress-encoder calibration killed with SIGKILL at random points, then re-run: same result, nothing corrupt.

The calibration keeps finished layers in a work folder next to --out (atomic writes); the re-run of the same
command resumes from them. The result must equal an uninterrupted run's, with no layer counted twice and no
half-written file under a final name.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slimwhisper.lowrank import STATS_FILE, work_folder_for

LAYERS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-layer random model (tiny's vocabulary, a narrow width so each run takes seconds) and three 2-s wavs."""
    from slimwhisper.geometry import random_model

    root = tmp_path_factory.mktemp("kill")
    model = random_model("tiny", root / "model", layers=LAYERS, seed=3, d_model=64,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                         decoder_ffn_dim=256)
    audio = root / "audio"
    audio.mkdir()
    for i in range(3):
        rng = np.random.default_rng(i)
        t = np.arange(32_000) / 16_000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(audio / f"clip{i}.wav", wave.astype(np.float32), 16_000)
    return model, audio


def argv(model: Path, audio: Path, out: Path) -> list[str]:
    # a budget below one layer's statistics: one pass per layer, so kills land between finished layers
    return ["compress-encoder", str(model), "--calibration", str(audio), "--out", str(out), "--quiet",
            "--granule", "8", "--stats-budget-gib", "0.001", "--device", "cpu"]


def env() -> dict[str, str]:
    """The subprocesses use this process's thread count, so their sums are bitwise comparable."""
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slimwhisper.cli", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, deadline_s: float = 40.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (or when it has ended on its own)."""
    end = time.monotonic() + deadline_s
    while proc.poll() is None and not ready() and time.monotonic() < end:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_nothing_corrupt(out: Path) -> None:
    """Every file under a final name (in --out and the work folder) opens; temporary ones are hidden."""
    work = work_folder_for(out)
    for folder in (out, work):
        for path in folder.glob("*.safetensors") if folder.is_dir() else []:
            with safe_open(str(path), "pt") as f:
                assert list(f.keys()), path


def rerun(args: list[str]) -> None:
    proc = start(args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


def assert_same_result(out: Path, reference: Path, note: str) -> None:
    for name in ("model.safetensors", STATS_FILE):
        got, want = load_file(str(out / name)), load_file(str(reference / name))
        assert got.keys() == want.keys(), (note, name)
        worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
        assert worst <= 1e-6, (note, name, worst)
    assert not work_folder_for(out).exists(), note  # the finished run cleans its work folder


def test_work_folder_resumes_finished_layers_and_refuses_other_settings(tmp_path, monkeypatch):
    """In process: a folder holding layer 0 makes the next run measure layers 1 and 2 only, to equal sums."""
    import importlib
    import shutil

    from slimwhisper.errors import SlimWhisperError
    from slimwhisper.geometry import random_whisper
    from slimwhisper.lowrank.config import TARGETS
    from slimwhisper.lowrank.convert import find_linears, work_settings

    cal = importlib.import_module("slimwhisper.lowrank.calibrate")  # the package exports a function of that name
    model = random_whisper("tiny", LAYERS, seed=1, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128)[0]
    targets = find_linears(model, TARGETS)
    items = [np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1]
    settings = work_settings(model, targets, items, 1)
    full = cal.measure_stats(model, items, targets, cal.CalibrationWork(tmp_path / "a", settings), batch_size=1,
                             budget_bytes=1, progress=False).in_memory()
    resumed = tmp_path / "b"
    resumed.mkdir()
    for name in (cal.MANIFEST, "layer-000.safetensors"):
        shutil.copy(tmp_path / "a" / name, resumed / name)
    (resumed / ".layer-001.safetensors.tmp-1").write_bytes(b"half a file")  # a killed writer's leftover
    passes = []
    real = cal.collect_linear_stats
    monkeypatch.setattr(cal, "collect_linear_stats", lambda *a, **k: passes.append(k["stop_after"]) or real(*a, **k))
    again = cal.measure_stats(model, items, targets, cal.CalibrationWork(resumed, settings), batch_size=1,
                              budget_bytes=1, progress=False).in_memory()
    assert passes == [1, 2] and not list(resumed.glob(".*.tmp-*"))
    assert again.windows == full.windows == 1
    for name, s in full.layers.items():
        assert torch.equal(again.layers[name].gram, s.gram) and again.layers[name].rows == s.rows == 1500, name
    with pytest.raises(SlimWhisperError, match="other settings"):
        cal.CalibrationWork(resumed, {**settings, "batch_size": 2}).open()


SR = 16_000


@pytest.mark.slow
def test_killed_calibration_resumes_to_the_uninterrupted_result(setup, tmp_path):
    from slimwhisper.cli import main

    model, audio = setup
    reference = tmp_path / "reference"
    assert main(argv(model, audio, reference)) == 0
    stats = load_file(str(reference / STATS_FILE))
    rows = [float(v[0]) for k, v in stats.items() if k.endswith(".rows")]
    # three windows of 2 s, each layer counted once: each window weighs its audio frames over their share
    from slimwhisper.lowrank.calibrate import audio_frames
    from slimwhisper.lowrank.config import AUDIO_WEIGHT
    assert rows and rows == pytest.approx([3 * audio_frames(2 * SR) / AUDIO_WEIGHT] * len(rows))

    seed = random.randrange(10**6)
    out = tmp_path / "first"
    began = time.monotonic()  # kill 1: right after the first layer's file appears
    kill_when(start(argv(model, audio, out)), lambda: (work_folder_for(out) / "layer-000.safetensors").is_file())
    first_layer_s = time.monotonic() - began
    finish_and_compare(out, model, audio, reference, "after the first layer file")

    out = tmp_path / "random"  # kill 2: anywhere from model loading to the last layers (scaled to this machine)
    delay = first_layer_s * random.Random(seed).uniform(0.7, 1.8)
    began = time.monotonic()
    kill_when(start(argv(model, audio, out)), lambda: time.monotonic() - began > delay)
    finish_and_compare(out, model, audio, reference, f"at {delay:.2f} s (seed {seed})")


def finish_and_compare(out: Path, model: Path, audio: Path, reference: Path, note: str) -> None:
    """No corrupt file after the kill; the same command then finishes with the uninterrupted result."""
    assert_nothing_corrupt(out)
    if not (out / "model.safetensors").is_file():  # killed before the end: the same command resumes
        rerun(argv(model, audio, out))
    assert_same_result(out, reference, note)
