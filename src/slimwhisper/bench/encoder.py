"""Encoder speed: wall time of one encoder pass over 30-s inputs, a (low-rank) model against a baseline.

`slimwhisper bench encoder MODEL --baseline MODEL [--batch 1] [--repeats 5] [--quantize int8] --json`

Times saved models as they are, interleaved (A B A B ...) after a warm-up, medians compared in one
run. To sweep the LiteASR presets (calibrate, convert, time, WER) use
`benchmarks/encoder_lowrank.py`, which converts on the fly. `--quantize int8` times both models with
the engine's int8 linears (CPU only; the halves of a low-rank linear are quantised too).

`roofline` puts each model's pass on this machine's roofline: its FLOPs by part (convolutions, dense
linears, low-rank linears at their rank, attention on the path it takes), its least bytes, this machine's
measured float32 matmul rate and copy bandwidth (and int8 linear rate with --quantize), the bound
max(compute time, bytes / bandwidth), which of the two binds, the share of the bound the measured pass
reaches and the GFLOP/s it achieves (`slimwhisper.roofline`), and `speedup_bound`: the baseline's bound over
each model's, the speed-up its FLOPs and bytes allow (a low-rank encoder's linears shrink, its attention and
convolutions do not). `profile` says where a pass's time goes:
one more pass per model after the timed ones (`--profile-passes N`: N, models in turns, the median of
each part), under torch.profiler, with its ops' times in ms summed into linear_dense, linear_lowrank (the
halves of every `LowRankLinear`), attention (SDPA, and the rank-space products around it), gelu,
layer_norm, conv, copies and other, "total" (their sum) and "wall" (the profiled pass's wall time: the
rest is Python between ops and the profiler's own cost). One op's time swings widely when other
processes share the cores (a thread of the op's team waits for its core), so on a busy machine profile
several passes, or run with fewer --threads. `--attention-path standard` runs the model's low-rank attention
through HF's attention path instead of its own SDPA call (`WhisperLowRankAttention.attention_path`) while the
baseline keeps its default: a model timed against itself that way shows what the call buys apart from the ranks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..cliargs import add_batch_size, add_model, resolve_device
from ..engine.quantize import QUANTIZE_CHOICES, is_quantized_linear, quantize
from ..errors import SlimWhisperError
from ..lowrank.modules import ATTENTION_PATHS, LowRankLinear, WhisperLowRankAttention
from ..roofline import MachinePeaks, encoder_roofline, measure_peaks
from .common import add_model_run_args, finish_model_run, interleaved_times, load_for_bench, median_ms, set_threads

PROFILE_PARTS = ("linear_dense", "linear_lowrank", "attention", "gelu", "layer_norm", "conv", "copies", "other")
RANGE_PREFIX = "slimwhisper::"  # profiler ranges opened around every linear module's call
# an op is counted in the part of the outermost op (or linear range) whose name holds one of these words
OP_PARTS = (
    (("scaled_dot_product", "softmax", "matmul", "bmm", "einsum", "baddbmm"), "attention"),
    (("gelu",), "gelu"),
    (("layer_norm",), "layer_norm"),
    (("conv",), "conv"),
    (("linear", "addmm", "aten::mm"), "linear_dense"),
    (("copy_", "contiguous", "clone", "_to_copy", "aten::to", "aten::cat"), "copies"),
)


def encoder_params(model: nn.Module) -> int:
    """Weights of the encoder, an int8 linear's packed weight and bias included."""
    total = 0
    for module in model.get_encoder().modules():
        if is_quantized_linear(module):
            bias = module.bias()
            total += module.weight().numel() + (0 if bias is None else bias.numel())
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def set_attention_path(model: nn.Module, path: str) -> None:
    """Every low-rank attention module of `model` runs on `path` (`WhisperLowRankAttention.attention_path`)."""
    for module in model.modules():
        if isinstance(module, WhisperLowRankAttention):
            module.attention_path = path


def op_part(name: str) -> str | None:
    """The profile part an op (or one of our linear ranges) of this name counts in, or None."""
    if name.startswith(RANGE_PREFIX):
        return name[len(RANGE_PREFIX):]
    return next((part for words, part in OP_PARTS if any(w in name for w in words)), None)


def _linear_ranges(encoder: nn.Module) -> Callable[[], None]:
    """Open a profiler range named after its part around every linear's call; returns the undo."""
    halves = {id(half) for m in encoder.modules() if isinstance(m, LowRankLinear) for half in (m.down, m.up)}
    open_ranges: list[Any] = []
    handles = []

    def enter(name: str):
        def pre(module, args):
            r = torch.profiler.record_function(RANGE_PREFIX + name)
            r.__enter__()
            open_ranges.append(r)
        return pre

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for m in encoder.modules():
        if isinstance(m, nn.Linear) or is_quantized_linear(m):
            part = "linear_lowrank" if id(m) in halves else "linear_dense"
            handles += [m.register_forward_pre_hook(enter(part)), m.register_forward_hook(leave)]
    return lambda: [h.remove() for h in handles]


def profile_pass(model: nn.Module, features: torch.Tensor) -> dict[str, float]:
    """ms per part of one encoder pass of `model` over `features`, by torch.profiler (module docstring).

    Every op counts in the part of its outermost ancestor that has one (a copy inside a convolution is
    convolution time), ops of no part in "other"; on a GPU the ops' device times are summed.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # kineto prints a line to stderr at every start and stop of the profiler; keep a summary readable (the
    # variable is read when the profiler first starts; set it yourself to see kineto's messages)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    encoder = model.get_encoder()
    cuda = features.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    undo = _linear_ranges(encoder)
    try:
        with torch.inference_mode(), profile(activities=activities) as prof:
            start = time.perf_counter()
            encoder(features)
            if cuda:
                torch.cuda.synchronize(features.device)
            wall = time.perf_counter() - start
    finally:
        undo()
    us: dict[str, float] = defaultdict(float)

    def own_us(event) -> float:
        return getattr(event, "self_device_time_total", 0.0) if cuda else event.self_cpu_time_total

    def add(event, part: str | None) -> None:
        part = part or op_part(event.name)
        us[part or "other"] += own_us(event)
        for child in event.cpu_children:
            add(child, part)

    for event in prof.events():  # the CPU-side op trees (an op's device time is its kernels')
        if event.cpu_parent is None and event.device_type == DeviceType.CPU:
            add(event, None)
    out = {part: us.get(part, 0.0) / 1e3 for part in PROFILE_PARTS}
    out["total"] = sum(out.values())
    out["wall"] = wall * 1e3
    return out


def profile_passes_median(models: dict[str, nn.Module], features: torch.Tensor, passes: int
                          ) -> dict[str, dict[str, float]]:
    """Per model, the median of each part (and of "wall") over `passes` profiled passes, models in turns;
    "total" is the sum of the parts' medians."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for _ in range(passes):
        for k, m in models.items():
            runs[k].append(profile_pass(m, features))
    out = {}
    for k, profiles in runs.items():
        median = {part: statistics.median(p[part] for p in profiles) for part in (*PROFILE_PARTS, "wall")}
        median["total"] = sum(median[part] for part in PROFILE_PARTS)
        out[k] = {part: median[part] for part in (*PROFILE_PARTS, "total", "wall")}
    return out


def bench_encoder(
    models: dict[str, nn.Module], batch: int = 1, repeats: int = 5, warmup: int = 1, baseline: str = "baseline",
    profile: bool = True, roofline: bool = True, peaks: MachinePeaks | None = None, profile_passes: int = 1,
) -> dict[str, Any]:
    """Median ms of one encoder pass over `batch` random 30-s log-mel inputs per model, and ratios to `baseline`.

    With `profile`, "profile" holds each model's ms per part of `profile_passes` more passes (`profile_pass`,
    models in turns, the median of each part); with `roofline`,
    "roofline" each model's pass on this machine's roofline (`slimwhisper.roofline.encoder_roofline`), on
    `peaks` or, when not given, on peaks measured now.
    """
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
    if profile and profile_passes > 0:
        result["profile"] = profile_passes_median(models, features, profile_passes)
        result["profile_passes"] = profile_passes
    if roofline:
        result["roofline"] = roofline_of(models, ms, batch, peaks, result.get("profile"))
        if baseline in ms:  # the speed-up the FLOPs and bytes allow: where every part runs at the machine's rates
            bounds = {k: e["bound_ms"] for k, e in result["roofline"]["entries"].items()}
            result["roofline"]["speedup_bound"] = {k: bounds[baseline] / v for k, v in bounds.items() if k != baseline}
    return result


def roofline_of(models: dict[str, nn.Module], ms: dict[str, float], batch: int, peaks: MachinePeaks | None = None,
                profiles: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """{"machine": the peaks, "entries": `encoder_roofline` per model}; with `profiles`, each entry's
    "gflops_parts" gives the GFLOP/s each counted part reached in its profiled time."""
    if peaks is None:
        int8 = any(is_quantized_linear(x) for m in models.values() for x in m.get_encoder().modules())
        peaks = measure_peaks(int8=int8)
    machine = {"gflops": peaks.gflops, "gbps": peaks.gbps}
    if peaks.int8_gflops is not None:
        machine["int8_gflops"] = peaks.int8_gflops
    entries = {}
    for name, m in models.items():
        entry = encoder_roofline(m, batch, ms[name], peaks)
        if profiles and name in profiles:
            entry["gflops_parts"] = {part: gflop / profiles[name][part] * 1e3
                                     for part, gflop in entry["gflop_parts"].items() if profiles[name][part] > 0}
        entries[name] = entry
    return {"machine": machine, "entries": entries}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench encoder`."""
    p = subparsers.add_parser("encoder", help="encoder ms per 30-s pass of a model against a baseline, where "
                              "the time goes and its roofline",
                              description=" ".join(__doc__.split("\n\n")[2].split()))
    add_model(p)
    p.add_argument("--baseline", help="model to compare against (e.g. the original)")
    add_batch_size(p, 1, "30-s windows encoded together")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantise both models as the engine does (int8 linears, CPU) before timing")
    p.add_argument("--attention-path", choices=ATTENTION_PATHS, default="auto",
                   help="how the model's low-rank attention runs (default auto; standard: HF's attention path); "
                        "the baseline keeps auto, so MODEL against itself shows what the module's own path buys")
    p.add_argument("--profile-passes", type=int, default=1,
                   help="profiled passes per model after the timed ones; each part's median is reported (0: none)")
    add_model_run_args(p)
    return p


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human summary: per model its time, size, speedup and roofline, then where its time goes."""
    lines = []
    for key, ms in result["ms_per_pass"].items():
        speed = result.get("speedup", {}).get(key)
        roof = result.get("roofline", {}).get("entries", {}).get(key)
        lines.append(f"{key:>10}: {ms:8.1f} ms/pass  {result['params'][key] / 1e6:.2f} M encoder params"
                     + (f"  {speed:.2f}x vs baseline" if speed else "")
                     + (f"  {roof['gflop']:.1f} GFLOP, {roof['gflops_achieved']:.0f} GFLOP/s, roofline "
                        f"{roof['bound_ms']:.1f} ms ({roof['bound_by']}), {100 * roof['attained']:.0f}% of it"
                        if roof else ""))
        prof = result.get("profile", {}).get(key)
        if prof:
            parts = ", ".join(f"{part} {prof[part]:.1f}" for part in PROFILE_PARTS if prof[part] >= 0.05)
            lines.append(f"{'':>10}  profile ms: {parts} (of {prof['wall']:.1f} ms profiled)")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.quantize and torch.device(resolve_device(args.device)).type != "cpu":  # before loading anything
        raise SlimWhisperError(f"--quantize {args.quantize} runs on the CPU only; drop --quantize or use --device cpu")
    if args.profile_passes < 0:
        raise SlimWhisperError(f"--profile-passes must be >= 0, got {args.profile_passes}")
    threads = set_threads(args.threads)
    models = {"model": load_for_bench(args.model, args.device, args.dtype)}
    if args.baseline:
        models = {"baseline": load_for_bench(args.baseline, args.device, args.dtype), **models}
    set_attention_path(models["model"], args.attention_path)  # the baseline keeps the default
    if args.quantize:
        models = {k: quantize(m, args.quantize) for k, m in models.items()}
    result = bench_encoder(models, args.batch_size, args.repeats, args.warmup, profile_passes=args.profile_passes)
    result["quantize"] = args.quantize
    result["attention_path"] = args.attention_path
    if finish_model_run(result, args, threads):
        return 0
    print("\n".join(summary_lines(result)))
    return 0
