"""Peak memory of compress-encoder calibration on a released geometry, per layer count, and for the full model.

`slimwhisper bench calibrate --geometry large-v3 --layers 1 2 4 --out DIR --json`

Each layer count runs in a fresh process (so the peak is that calibration's own): a random-weight model of
the geometry with that many layers measures the encoder statistics of every linear on a few seconds of
synthetic audio, group by group into a temporary work folder, as compress-encoder does. The peak resident
memory (Linux VmHWM, reset after the model is built) is split into what the process held before (runtime and
weights) and what calibration added (the statistics of one layer group, plus activations of one window).
The full model's peak is extrapolated from those parts: its own weights, its largest group, the same rest.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ..errors import SlimWhisperError
from ..geometry import GEOMETRIES
from .common import (
    add_result_args,
    current_rss_bytes,
    reset_peak_rss,
    rss_high_water_bytes,
    run_metadata,
    write_result,
)

SR = 16_000


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone sweep with noise: speech-like energy spread, no data files needed."""
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    return wave.astype(np.float32)


def measure_one(geometry: str, layers: int, seconds: float, budget_bytes: int) -> dict[str, Any]:
    """Build the model, then calibrate it with the peak-RSS mark reset: this process's figures as a dict."""
    from ..geometry import random_whisper
    from ..lowrank.calibrate import CalibrationWork, layer_groups, measure_stats, stats_bytes
    from ..lowrank.config import AUDIO_WEIGHT, TARGETS
    from ..lowrank.convert import find_linears, work_settings

    model = random_whisper(geometry, layers)[0]
    targets = find_linears(model, TARGETS)
    items = [synthetic_audio(seconds)]
    settings = work_settings(model, targets, items, batch_size=1, audio_weight=AUDIO_WEIGHT)
    groups = layer_groups(targets, budget_bytes)
    per_layer = sum(stats_bytes(m.out_features) for n, m in targets.items() if n.split(".")[3] == "0")
    gc.collect()
    before = current_rss_bytes()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimwhisper-bench-") as folder:
        stats = measure_stats(model, items, targets, CalibrationWork(folder, settings), batch_size=1,
                              budget_bytes=budget_bytes, progress=False, audio_weight=AUDIO_WEIGHT)
        windows = stats.windows
    return {
        "layers": layers,
        "peak_rss_bytes": rss_high_water_bytes(),
        "rss_before_bytes": before,
        "peak_reset": reset_ok,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "stats_bytes_per_layer": per_layer,
        "largest_group_layers": max(len(g) for g in groups),
        "groups": len(groups),
        "windows": windows,
        "seconds": round(time.perf_counter() - start, 2),
    }


def extrapolate(geometry: str, rows: list[dict[str, Any]], budget_bytes: int) -> dict[str, Any]:
    """The full model's peak: runtime + its fp32 weights + its largest group's statistics + the measured rest."""
    from ..geometry import parameter_count, whisper_config

    full_layers = GEOMETRIES[geometry][2]
    per_layer = rows[0]["stats_bytes_per_layer"]
    group_layers = max(1, min(full_layers, budget_bytes // per_layer))
    runtime = min(r["rss_before_bytes"] - r["weight_bytes"] for r in rows)
    rest = max(r["peak_rss_bytes"] - r["rss_before_bytes"] - r["largest_group_layers"] * per_layer for r in rows)
    weights = parameter_count(whisper_config(geometry)) * 4
    return {
        "encoder_layers": full_layers,
        "weight_bytes": weights,
        "largest_group_layers": group_layers,
        "group_stats_bytes": group_layers * per_layer,
        "runtime_bytes": runtime,
        "activation_and_other_bytes": rest,
        "peak_rss_bytes": runtime + weights + group_layers * per_layer + rest,
        "all_layers_stats_bytes": full_layers * per_layer,  # what holding every layer at once would take
    }


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench calibrate`."""
    p = subparsers.add_parser("calibrate", help="peak memory of compress-encoder calibration vs layers",
                              description=" ".join(__doc__.split("\n\n")[2].split()))
    p.add_argument("model", nargs="?", metavar="SIZE", help="released size, as --geometry (the model-first form)")
    p.add_argument("--geometry", choices=tuple(GEOMETRIES), help="released size (default large-v3), built with "
                   "random weights")
    p.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4], help="layer counts, each in its own process")
    p.add_argument("--seconds", type=float, default=4.0, help="synthetic calibration audio (default 4 s)")
    p.add_argument("--stats-budget-gib", type=float, default=2.0, help="statistics held at once (as compress-encoder)")
    add_result_args(p)
    return p


def _child(args: list[str]) -> int:
    """`python -m slimwhisper.bench.calibrate GEOMETRY LAYERS SECONDS BUDGET`: print one measurement as JSON."""
    geometry, layers, seconds, budget = args[0], int(args[1]), float(args[2]), int(args[3])
    print(json.dumps(measure_one(geometry, layers, seconds, budget)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.model is not None and args.model not in GEOMETRIES:
        raise SlimWhisperError(f"bench calibrate builds a released size with random weights; name one of "
                               f"{', '.join(GEOMETRIES)}, e.g. `slimwhisper bench calibrate large-v3`")
    if args.model is not None and args.geometry not in (None, args.model):
        raise SlimWhisperError(f"two sizes given ({args.model} and --geometry {args.geometry}); give one")
    args.geometry = args.model or args.geometry or "large-v3"
    if any(n < 1 for n in args.layers) or args.seconds <= 0 or args.stats_budget_gib <= 0:
        raise SlimWhisperError("--layers, --seconds and --stats-budget-gib must be positive, e.g. --layers 1 2 4")
    budget = int(args.stats_budget_gib * 2**30)
    rows = []
    for layers in sorted(set(args.layers)):
        cmd = [sys.executable, "-m", __name__, args.geometry, str(layers), str(args.seconds), str(budget)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlimWhisperError(f"calibrating {layers} layer(s) failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"geometry": args.geometry, "seconds": args.seconds, "stats_budget_bytes": budget, "rows": rows,
              "full_model": extrapolate(args.geometry, rows, budget),
              **run_metadata(geometry=args.geometry, layers=args.layers, seconds=args.seconds)}
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result))
        return 0
    for r in rows:
        print(f"{args.geometry}, {r['layers']} layer(s): peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"({r['groups']} group(s) of at most {r['largest_group_layers']})")
    full = result["full_model"]
    print(f"full model ({full['encoder_layers']} layers): about {full['peak_rss_bytes'] / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
