"""`finetune` killed with SIGKILL at chosen and random points, then re-run: the uninterrupted result, nothing lost.

One output folder is killed again and again (inside a checkpoint write, between its two renames, right after
the model was saved, at a random moment), the same command re-run each time, and finally run to the end.
Its weights and loss log must equal an uninterrupted run's, every step logged once, no checkpointed step
trained again, and no half-written file may sit under a final name. The checkpoint write is widened by a
test-only hook (SLIMWHISPER_TEST_SLOW_CHECKPOINT) so the kills land inside it.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slimwhisper.recovery.train import LOG_FIELDS, SLOW_CHECKPOINT_ENV

from .finetune_runs import save_slim_model

pytestmark = pytest.mark.slow

ARMS = ("model",)
PAUSE_S = "0.3"  # each checkpoint write sleeps this long, twice, in the killed runs only


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A saved tiny original, its MLA conversion (which records the original) and 6 clips."""
    from conftest import write_clips

    root = tmp_path_factory.mktemp("kill-finetune")
    return root, save_slim_model(root), write_clips(root / "data", n=6)


def argv(slim: Path, manifest: Path, out: Path, cache: Path) -> list[str]:
    # a checkpoint after every step, so kills land between, inside and around checkpoints of both arms
    return ["finetune", str(slim), "--train", str(manifest), "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--checkpoint-every", "1", "--lr", "1e-2", "--warmup-steps", "0",
            "--cache-dir", str(cache), "--device", "cpu", "--quiet"]


def start(args: list[str], slow: bool) -> subprocess.Popen:
    """The CLI as a subprocess with this process's thread count, so its sums compare exactly with the reference."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    env.pop(SLOW_CHECKPOINT_ENV, None)
    if slow:
        env[SLOW_CHECKPOINT_ENV] = PAUSE_S
    return subprocess.Popen([sys.executable, "-m", "slimwhisper.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(args: list[str]) -> None:
    proc = start(args, slow=False)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]


def kill_when(proc: subprocess.Popen, ready, deadline_s: float = 60.0) -> int:
    """SIGKILL `proc` as soon as `ready()` holds (unless it ended first); returns its exit code."""
    end = time.monotonic() + deadline_s
    while proc.poll() is None and not ready() and time.monotonic() < end:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def assert_nothing_corrupt(out: Path, cache: Path) -> None:
    """Every file under a final name opens; temporary names are only ever hidden or suffixed."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name.startswith(".") or ".tmp" in path.name:
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                assert list(f.keys()), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=False)
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 100, path
        elif path.suffix == ".csv":
            assert all(len(line.split(",")) == len(LOG_FIELDS) for line in path.read_text().splitlines()), path
    for path in cache.rglob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=True)
    for path in cache.rglob("*.json"):
        json.loads(path.read_text())


def loss_rows(out: Path, arm: str) -> list[list[str]]:
    """(step, lr, loss, ce, kd) of every logged row; the time column differs between runs."""
    return [line.split(",")[:5] for line in (out / "work" / arm / "loss.csv").read_text().splitlines()]


def checkpointed_rows(work: Path) -> list[str]:
    """The loss.csv lines a complete checkpoint covers (the previous one, if a kill came between the renames):
    a re-run must keep them as they are, time column included, rather than train those steps again."""
    states = [work / name / "state.json" for name in ("checkpoint", "checkpoint.old")]
    state = next((s for s in states if s.is_file()), None)
    if state is None or not (work / "loss.csv").is_file():
        return []
    step = json.loads(state.read_text())["step"]
    return (work / "loss.csv").read_text().splitlines()[: step + 1]


def assert_same_result(out: Path, reference: Path, note: str) -> None:
    for arm in ARMS:
        got = load_file(str(out / arm / "model.safetensors"))
        want = load_file(str(reference / arm / "model.safetensors"))
        assert got.keys() == want.keys(), (note, arm)
        worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
        assert worst == 0.0, (note, arm, worst)
        assert loss_rows(out, arm) == loss_rows(reference, arm), (note, arm)  # each step once, same values
        assert [r[0] for r in loss_rows(out, arm)[1:]] == ["1", "2", "3", "4"], (note, arm)
    record = json.loads((out / "finetune.json").read_text())
    assert all(record["arms"][arm]["finished"] and record["arms"][arm]["steps_done"] == 4 for arm in ARMS), note
    left = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old", ".partial"))]
    assert not left, (note, left)


def test_killed_finetune_resumes_to_the_uninterrupted_result(setup, monkeypatch):
    from slimwhisper.cli import main

    root, slim, manifest = setup
    reference = root / "reference"
    monkeypatch.delenv(SLOW_CHECKPOINT_ENV, raising=False)
    cache = root / "cache"  # shared: its entries are content-addressed, and the killed runs start quicker
    assert main(argv(slim, manifest, reference, cache)) == 0  # in this process: quicker

    out = root / "out"
    args = argv(slim, manifest, out, cache)
    work = out / "work"
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.5, 8.0)
    began = time.monotonic()
    cases = {  # each one kills the re-run of the same command; all but the last must catch the run alive
        "inside the first checkpoint write": lambda: (work / "model/checkpoint.tmp/trainable.safetensors").is_file(),
        "between the renames of a checkpoint": lambda: (work / "model/checkpoint.old").is_dir(),
        "right after the model was saved": lambda: (out / "model/config.json").is_file(),
        f"at {delay:.2f} s (seed {seed})": lambda: time.monotonic() - began > delay,
    }
    kept = {}
    for i, (note, ready) in enumerate(cases.items()):
        began = time.monotonic()
        code = kill_when(start(args, slow=True), ready)
        assert code == -signal.SIGKILL or (i == len(cases) - 1 and code == 0), (note, code)
        assert_nothing_corrupt(out, cache)
        kept[note] = checkpointed_rows(work / "model")
    finish(args)
    assert_nothing_corrupt(out, cache)
    assert_same_result(out, reference, f"seed {seed}")
    final = (work / "model" / "loss.csv").read_text().splitlines()
    for note, rows in kept.items():  # nothing checkpointed was lost and trained again
        assert final[: len(rows)] == rows, note
    assert len(kept["between the renames of a checkpoint"]) > 1  # that kill came after a complete checkpoint
