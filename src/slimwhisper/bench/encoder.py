"""Encoder speed: wall time of one encoder pass over 30-s inputs, a (low-rank) model against a baseline.

`slimwhisper bench encoder MODEL --baseline MODEL [--batch 1] [--repeats 5] --json`

Times saved models as they are, interleaved (A B A B ...) after a warm-up, medians compared in one
run. To sweep the LiteASR presets (calibrate, convert, time, WER) use
`benchmarks/encoder_lowrank.py`, which converts on the fly.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..cliargs import add_batch_size, add_model
from .common import add_model_run_args, finish_model_run, interleaved_times, load_for_bench, median_ms, set_threads


def encoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_encoder().parameters())


def bench_encoder(
    models: dict[str, nn.Module], batch: int = 1, repeats: int = 5, warmup: int = 1, baseline: str = "baseline"
) -> dict[str, Any]:
    """Median ms of one encoder pass over `batch` random 30-s log-mel inputs per model, and ratios to `baseline`."""
    first = next(iter(models.values()))
    param = next(first.parameters())
    frames = 2 * first.config.max_source_positions  # the encoder's conv stride 2 maps 3000 mel frames to 1500
    features = torch.randn(batch, first.config.num_mel_bins, frames, generator=torch.Generator().manual_seed(0))
    features = features.to(param.device, param.dtype)

    def runner(model: nn.Module):
        encoder = model.get_encoder()
        return lambda: encoder(features)

    with torch.inference_mode():
        times = interleaved_times({k: runner(m) for k, m in models.items()}, repeats, warmup, device=param.device)
    ms = {k: median_ms(t) for k, t in times.items()}
    result: dict[str, Any] = {"ms_per_pass": ms, "params": {k: encoder_params(m) for k, m in models.items()}}
    if baseline in ms:
        result["speedup"] = {k: ms[baseline] / v for k, v in ms.items() if k != baseline}
        result["params_ratio"] = {k: v / result["params"][baseline] for k, v in result["params"].items()}
    result.update(batch=batch, repeats=repeats, warmup=warmup,
                  times_ms={k: [round(x * 1e3, 3) for x in t] for k, t in times.items()})
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench encoder`."""
    p = subparsers.add_parser("encoder", help="encoder ms per 30-s pass of a model against a baseline",
                              description=" ".join(__doc__.split("\n\n")[2].split()))
    add_model(p)
    p.add_argument("--baseline", help="model to compare against (e.g. the original)")
    add_batch_size(p, 1, "30-s windows encoded together")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    add_model_run_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    models = {"model": load_for_bench(args.model, args.device, args.dtype)}
    if args.baseline:
        models = {"baseline": load_for_bench(args.baseline, args.device, args.dtype), **models}
    result = bench_encoder(models, args.batch_size, args.repeats, args.warmup)
    if finish_model_run(result, args, threads):
        return 0
    for key, ms in result["ms_per_pass"].items():
        speed = result.get("speedup", {}).get(key)
        print(f"{key:>10}: {ms:8.1f} ms/pass  {result['params'][key] / 1e6:.2f} M encoder params"
              + (f"  {speed:.2f}x vs baseline" if speed else ""))
    return 0
