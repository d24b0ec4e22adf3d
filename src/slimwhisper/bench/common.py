"""Shared benchmark helpers: run metadata (machine, versions, commit, threads), interleaved timing, JSON out.

Timings on a shared machine are noisy, so every benchmark compares variants *within one run*:
`interleaved_times` runs the variants in turn (A B A B ...) after a warm-up, so a burst of load
hits all of them, and the figures reported are medians and ratios.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..cliargs import add_device, add_json, add_out, resolve_device
from ..errors import SlimWhisperError


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, torch threads, memory and GPU (if any) of this machine."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict[str, str]:
    """Versions of Python, torch, transformers and slimwhisper."""
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slimwhisper": __version__,
    }


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """HEAD commit of the checkout holding `path` (default: this package), "+dirty" if tracked files changed.

    None outside a git checkout (e.g. an installed wheel).
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None keeps torch's default); returns the number in use."""
    if threads is not None:
        if threads < 1:
            raise SlimWhisperError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_metadata(**settings: Any) -> dict[str, Any]:
    """What every result file records: when, where (machine, threads), with what (versions, commit, command)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),  # quoted, so an argument with spaces reads back as one
        "machine": machine_info(),
        "versions": versions(),
        "commit": git_commit(),
        "settings": settings,
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux `clear_refs` 5), so a later peak measures one phase only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_status_bytes(field: str) -> int | None:
    """A kB field of Linux's /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident memory now (Linux VmRSS; 0 where /proc is missing)."""
    return proc_status_bytes("VmRSS") or 0


def rss_high_water_bytes() -> int:
    """RSS high-water mark since start or the last `reset_peak_rss` (Linux VmHWM; else the lifetime peak)."""
    return proc_status_bytes("VmHWM") or peak_rss_bytes()


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so wall times are real (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
    before: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns (A B A B ...) after `warmup` untimed rounds.

    `before[name]`, if given, runs untimed right before each call of `fns[name]` (e.g. to switch a
    shared model's mode).
    """
    before = before or {}
    if repeats < 1:
        raise SlimWhisperError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = range(repeats)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="timing", unit="round")
    for _ in rounds:
        for name, fn in fns.items():
            if name in before:
                before[name]()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(seconds: list[float]) -> float:
    """Median of a list of durations in seconds, as milliseconds."""
    return statistics.median(seconds) * 1e3


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write `data` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file
    return path


def load_for_bench(name: str, device: str = "auto", dtype: str | None = None):
    """`slimwhisper.load` in eval mode, for a benchmark (a short name, a saved folder or a Hub id)."""
    from ..loading import load

    model, _ = load(name, device=resolve_device(device), dtype=dtype)
    return model.eval()


RESULT_FILE = "result.json"  # what every bench writes into --out


def add_model_run_args(p) -> None:
    """Arguments every model-timing bench shares: threads, device, dtype, --out DIR, --json."""
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    add_device(p)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    add_result_args(p)


def add_result_args(p) -> None:
    """--out DIR (the result JSON goes to DIR/result.json) and --json (print it)."""
    add_out(p, f"also write the result to DIR/{RESULT_FILE}", required=False)
    add_json(p)


def write_result(out: str | os.PathLike[str] | None, result: Mapping[str, Any]) -> Path | None:
    """Write a bench result as `out`/result.json (atomically), when --out was given."""
    if not out:
        return None
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SlimWhisperError(f"--out {folder} is a file; give a folder (the result goes to {folder}/{RESULT_FILE})")
    return write_json(folder / RESULT_FILE, result)


def finish_model_run(result: dict[str, Any], args, threads: int) -> bool:
    """Record what was run (models, threads, machine, versions), write --out and print --json; True if printed."""
    result["models"] = {"model": args.model, **({"baseline": args.baseline} if args.baseline else {})}
    result["threads"] = threads
    result.update(run_metadata(threads=threads, device=args.device, dtype=args.dtype))
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result))
    return bool(args.json)

