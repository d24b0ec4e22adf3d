"""bench/common.py: interleaved timing and run metadata."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import slimwhisper as sw
from slimwhisper.bench import common
from slimwhisper.errors import SlimWhisperError


def test_interleaved_times_alternate_and_run_hooks():
    calls: list[str] = []
    times = common.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2,
                                     warmup=1, before={"b": lambda: calls.append("hook")})
    assert calls == ["a", "hook", "b"] * 3
    assert [len(t) for t in times.values()] == [2, 2]
    slept = common.interleaved_times({"sleep": lambda: time.sleep(0.02)}, repeats=2, warmup=0)["sleep"]
    assert all(0.02 <= t < 1.0 for t in slept), slept  # seconds per call, the call itself timed
    with pytest.raises(SlimWhisperError):
        common.interleaved_times({"a": lambda: None}, repeats=0)


def test_run_metadata_describes_machine_and_versions():
    meta = common.run_metadata(threads=1)
    machine = meta["machine"]
    assert (machine["cores"], machine["threads"]) == (os.cpu_count(), torch.get_num_threads())
    assert machine["cpu"] == common.cpu_model() and machine["cpu"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["slimwhisper"] == sw.__version__
    assert meta["settings"] == {"threads": 1}
    # the peak is in bytes (Linux reports KiB, 1024x less): about what this process holds now or more; the
    # kernel syncs its high-water mark lazily, so it may trail the current size by a few pages
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert common.peak_rss_bytes() >= 0.9 * resident
