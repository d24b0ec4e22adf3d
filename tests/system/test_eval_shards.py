"""`slimwhisper eval` split over two processes (accelerate launch, torchrun) writes the summary and log of one
process, also when the split run is killed with SIGKILL and re-run.

`accelerate launch --cpu --num_processes 2` starts one process (its CPU path is the simple launcher unless an MPI
hostfile is given), so the split runs use `--multi_gpu`, which starts torchrun's workers on a CPU-only machine too.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
EVAL_ARGS = ["--batch-size", "1", "--engine", "generate", "--max-new-tokens", "6", "--quiet"]
FINISHED = ["summary.json", "summary.md", "utterances.jsonl"]
BIN = Path(sys.executable).parent


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


def free_port() -> int:
    """A port for the process group's rendezvous, so a killed run's port is never reused while it lingers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd() -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "-m", "slimwhisper.cli"]


def torchrun_cmd() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "slimwhisper.cli"]


def start(launcher: list[str], model: Path, data: Path, out: Path) -> subprocess.Popen:
    """The launcher in its own process group (a kill takes every worker), one thread per worker."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "eval", str(model), "--data", str(data), "--out", str(out), *EVAL_ARGS]
    return subprocess.Popen(cmd, env=env, preexec_fn=os.setpgrp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a launch to end well; its standard output."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out


def reference_run(model: Path, data: Path, out: Path) -> None:
    """`slimwhisper eval` in one process (this one), with one thread like each launched worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", str(model), "--data", str(data), "--out", str(out), *EVAL_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


def records(out: Path) -> list[dict]:
    """utterances.jsonl in order, without the per-utterance decoding time."""
    lines = (out / "utterances.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "decode_seconds"} for line in lines]


def assert_same_results(out: Path, ref: Path) -> None:
    """The same summary (timings aside), the same log in the same order, and no rank log left behind."""
    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert comparable(got) == comparable(want)
    assert got["n_utterances"] == N_CLIPS
    assert records(out) == records(ref)
    assert sorted(p.name for p in out.iterdir()) == FINISHED


def rank_records(out: Path) -> int:
    """Complete records in the rank logs (each starts with a header line)."""
    return sum(max(0, p.read_bytes().count(b"\n") - 1) for p in out.glob("utterances.rank-*.jsonl"))


def ids_in(log: Path) -> set[str]:
    """Utterance ids of a log's complete records."""
    return {json.loads(line)["id"] for line in log.read_bytes().split(b"\n")[1:-1] if line.strip()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, manifest, folder of the single-process run)."""
    root = tmp_path_factory.mktemp("eval_shards")
    model, data = save_tiny_model(root / "model"), write_manifest(root / "data")
    reference_run(model, data, root / "single")
    return model, data, root / "single"


def test_accelerate_launch_two_processes_gives_the_single_process_summary(setup, tmp_path: Path) -> None:
    model, data, ref = setup
    stdout = finish(start(accelerate_cmd(), model, data, tmp_path / "split"))
    assert "2 processes" in stdout  # the work really was split
    assert_same_results(tmp_path / "split", ref)


def test_split_run_killed_and_rerun_resumes_to_the_same_summary(setup, tmp_path: Path) -> None:
    model, data, ref = setup
    out = tmp_path / "split"
    proc = start(accelerate_cmd(), model, data, out)
    began = time.monotonic()
    while proc.poll() is None and rank_records(out) < 3:
        assert time.monotonic() - began < 180, "the split run did not start logging"
        time.sleep(0.005)
    assert proc.poll() is None, "the split run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= rank_records(out) < N_CLIPS
    logged = [ids_in(log) for log in sorted(out.glob("utterances.rank-*.jsonl"))]
    assert len(logged) == 2 and not logged[0] & logged[1]  # each process decoded its own utterances
    stdout = finish(start(torchrun_cmd(), model, data, out))  # the other launcher resumes the same folder
    assert "2 processes" in stdout
    assert_same_results(out, ref)
