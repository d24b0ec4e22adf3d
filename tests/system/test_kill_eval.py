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

import pytest

from .eval_runs import EVAL_ARGS, assert_same_results, reference_run, save_tiny_model, write_manifest

pytestmark = pytest.mark.slow


def child_env() -> dict[str, str]:
    """One thread per process (as torchrun sets it), so every run does the same arithmetic."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


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
