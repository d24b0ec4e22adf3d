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

import pytest

from .eval_runs import EVAL_ARGS, N_CLIPS, assert_same_results, reference_run, save_tiny_model, write_manifest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


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
