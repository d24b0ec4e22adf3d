"""`slimwhisper eval` killed with SIGKILL at random points and re-run ends where an uninterrupted run ends.

A random Whisper's transcripts are garbage, but deterministic: that is all a comparison of two runs needs.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tiny_pair
from slimwhisper.cli import main
from slimwhisper.eval.report import comparable
from slimwhisper.loading.processor import save_processor

pytestmark = pytest.mark.slow
N_CLIPS = 8
# decode one utterance per batch, so the log grows line by line and a kill can land between any two
EVAL_ARGS = ["--batch-size", "1", "--engine", "generate", "--max-new-tokens", "6", "--quiet"]
FINISHED = ["summary.json", "summary.md", "utterances.jsonl"]


def save_tiny_model(folder: Path) -> Path:
    """conftest's random 2-layer English-only Whisper (byte-level tokenizer), saved as a model folder."""
    model, processor = tiny_pair(False)
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return folder


def write_manifest(folder: Path, n: int = N_CLIPS) -> Path:
    """n short clips whose references differ in length, so a lost or doubled utterance changes every count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        t = np.arange(int(16_000 * (0.3 + 0.05 * i))) / 16_000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"u{i}.wav", audio.astype(np.float32), 16_000)
        text = " ".join(["word"] * (i + 1)) + f" number {i}"
        lines.append(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "lang": "en"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def child_env() -> dict[str, str]:
    """One thread per process (as torchrun sets it), so every run does the same arithmetic."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def reference_run(model: Path, data: Path, out: Path) -> None:
    """An uninterrupted single-process run, in this process (no second start-up of torch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", str(model), "--data", str(data), "--out", str(out), *EVAL_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_until(cmd: list[str], should_kill: Callable[[float], bool], timeout: float = 120.0) -> bool:
    """Run `cmd` in its own process group; SIGKILL the whole group once `should_kill(seconds since start)` holds.
    Returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen(cmd, env=child_env(), preexec_fn=os.setpgrp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    start = time.monotonic()
    while proc.poll() is None:
        if should_kill(time.monotonic() - start):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        assert time.monotonic() - start < timeout, "eval did not finish"
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


def after_seconds(delay: float) -> Callable[[float], bool]:
    return lambda seconds: seconds >= delay


def after_line(log: Path, n: int) -> Callable[[float], bool]:
    """Kill as soon as the log holds n lines."""
    return lambda _: count_lines(log) >= n


def after_progress(log: Path, delay: float) -> Callable[[float], bool]:
    """Kill `delay` seconds after the log first grows: somewhere in decoding, merging or writing the summary."""
    start_lines, grew_at = count_lines(log), []

    def check(seconds: float) -> bool:
        if not grew_at and count_lines(log) > start_lines:
            grew_at.append(seconds)
        return bool(grew_at) and seconds - grew_at[0] >= delay

    return check


def assert_intact(out: Path) -> None:
    """What a kill leaves is readable: whole JSON files, a log whose complete lines all parse."""
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())
    for log in sorted(out.glob("utterances*.jsonl")):
        lines = log.read_bytes().split(b"\n")[:-1]  # a torn tail (no newline yet) is cut off by the next run
        assert not lines or "_run" in json.loads(lines[0]), f"{log} has no header"
        for line in lines[1:]:
            json.loads(line)


def records(out: Path) -> list[dict]:
    """utterances.jsonl in order, without the per-utterance decoding time."""
    lines = (out / "utterances.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "decode_seconds"} for line in lines]


def assert_same_results(out: Path, ref: Path) -> None:
    """The same summary (timings aside), the same log in the same order, and nothing else left in the folder."""
    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert comparable(got) == comparable(want)
    assert got["n_utterances"] == N_CLIPS
    assert records(out) == records(ref)
    assert sorted(p.name for p in out.iterdir()) == FINISHED


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, manifest, folder of the uninterrupted run)."""
    root = tmp_path_factory.mktemp("kill_eval")
    model, data = save_tiny_model(root / "model"), write_manifest(root / "data")
    reference_run(model, data, root / "reference")
    return model, data, root / "reference"


def test_eval_killed_at_random_points_resumes_to_the_uninterrupted_result(setup, tmp_path: Path) -> None:
    model, data, ref = setup
    out = tmp_path / "killed"
    log = out / "utterances.jsonl"
    cmd = [sys.executable, "-m", "slimwhisper.cli", "eval", str(model), "--data", str(data), "--out", str(out),
           *EVAL_ARGS]
    rng = random.Random(1234)
    kills = [  # each run resumes what the one before left
        lambda: after_seconds(rng.uniform(0.5, 6.0)),  # anywhere, start-up included
        lambda: after_line(log, 4),  # right after the third record reached the disk
        lambda: after_progress(log, rng.uniform(0.0, 1.5)),  # decoding, merging the log or writing the summary
    ]
    for make in kills:
        run_until(cmd, make())
        assert_intact(out)
    assert not run_until(cmd, lambda _: False)
    assert_same_results(out, ref)
