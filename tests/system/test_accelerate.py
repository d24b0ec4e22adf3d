"""`finetune` over two processes (accelerate, gloo on the CPU) gives the weights of one process with the same
global batch: both arms, every tensor, within 1e-4 after 4 AdamW steps.

The transcripts differ in length, so the two processes hold different token counts in every step: the loss
must be normalised over the whole step's tokens, not averaged per process. The learning rate is high enough
that the weights move by far more than the tolerance, so the comparison means something.
`accelerate launch --cpu --num_processes 2` starts one process (accelerate's simple launcher): the run is
still correct, and finetune says so on stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file

from .finetune_runs import save_slim_model

pytestmark = pytest.mark.slow

WORDS = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.".split()
ARMS = ("model", "control")


def write_varied_clips(folder: Path, n: int = 8) -> Path:
    """n short tone clips whose transcripts run from one word to a dozen (uneven token counts per process)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        t = np.arange(int(16_000 * 0.6)) / 16_000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"c{i}.wav", audio.astype(np.float32), 16_000)
        text = " ".join(WORDS[: 1 + (5 * i) % len(WORDS)])
        lines.append(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "text": text, "lang": "en"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A saved tiny original, its MLA conversion (which records the original) and 8 clips."""
    root = tmp_path_factory.mktemp("accelerate")
    return root, save_slim_model(root), write_varied_clips(root / "data")


def finetune_args(slim: Path, manifest: Path, out: Path, cache: Path) -> list[str]:
    # the owner's `--steps 4 --batch-size 4`; lr 1e-2 and cross-entropy on the references, so both arms' weights
    # move far beyond the tolerance (on distillation alone a control has nothing to learn)
    return ["finetune", str(slim), "--train", str(manifest), "--steps", "4", "--batch-size", "4", "--out", str(out),
            "--control", "--cache-dir", str(cache), "--lr", "1e-2", "--warmup-steps", "0", "--no-label-free",
            "--ce-weight", "1", "--device", "cpu", "--quiet"]


def run(cmd: list[str]) -> str:
    """Run `cmd` (one thread per process, offline); returns its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def launch(*options: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "slimwhisper.cli"]


@pytest.fixture(scope="module")
def single(setup) -> Path:
    """The single-process reference run."""
    root, slim, manifest = setup
    out = root / "single"
    run([sys.executable, "-m", "slimwhisper.cli", *finetune_args(slim, manifest, out, root / "cache-single")])
    return out


def assert_same_weights(got: Path, want: Path, start: Path, arms: tuple[str, ...] = ARMS,
                        tolerance: float = 1e-4) -> None:
    """Every tensor of `arms` within `tolerance`, after moving far more than that from the start."""
    initial = {arm: load_file(str(start / name / "model.safetensors")) for arm, name in zip(ARMS, ("slim", "orig"))}
    for arm in arms:
        a, b = load_file(str(got / arm / "model.safetensors")), load_file(str(want / arm / "model.safetensors"))
        assert a.keys() == b.keys(), arm
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        moved = max(float((b[k].double() - initial[arm][k].double()).abs().max()) for k in b)
        assert worst <= tolerance and moved > 100 * tolerance, (arm, worst, moved)


def loss_rows(out: Path, arm: str) -> list[list[float]]:
    """(step, lr, loss, ce, kd) per logged step (time left out)."""
    lines = (out / "work" / arm / "loss.csv").read_text().splitlines()[1:]
    return [[float(x) for x in line.split(",")[:5]] for line in lines]


def test_two_processes_give_the_single_process_weights(setup, single):
    root, slim, manifest = setup
    out = root / "two"
    args = finetune_args(slim, manifest, out, root / "cache-two")
    run([*launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0"), *args])
    record = json.loads((out / "finetune.json").read_text())
    assert {arm: record["arms"][arm]["processes"] for arm in ARMS} == {"model": 2, "control": 2}
    assert_same_weights(out, single, root)
    for arm in ARMS:
        got, want = loss_rows(out, arm), loss_rows(single, arm)
        assert [r[0] for r in got] == [1, 2, 3, 4]  # one row per step: the second process writes nothing
        assert np.allclose(got, want, rtol=0, atol=1e-4), arm


def test_accelerate_cpu_flag_runs_one_process_and_says_so(setup, single):
    root, slim, manifest = setup
    out = root / "cpu-flag"
    args = [a for a in finetune_args(slim, manifest, out, root / "cache-cpu-flag") if a != "--control"]  # quicker
    err = run([*launch("--cpu", "--num_processes", "2"), *args])
    assert "starts one process" in err
    record = json.loads((out / "finetune.json").read_text())
    assert record["arms"]["model"]["processes"] == 1
    assert_same_weights(out, single, root, arms=("model",))
