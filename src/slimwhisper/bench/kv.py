"""KV-cache memory: analytic bytes per batch and cache length, bytes actually held, largest batch in a budget.

`slimwhisper bench kv MODEL [--baseline MODEL] [--batches 1 8 32 64] [--lengths 64 200 448] [--budget-gib 1] --json`

Analytic bytes come from `slimwhisper.memory.kv_cache_bytes` (self attention grows with decoded
tokens; cross attention holds the encoder output once per utterance, 1500 frames per 30-s window).
`int8_cache` is what the engine's int8 cache (`--kv-cache int8`) holds instead: one byte per
number plus a float32 scale per position and head (`memory.int8_cache_bytes`). "Held" bytes are what
a real prefilled `EncoderDecoderCache` holds (`cache_bytes_held`), measured
at a small batch to check the formula. The largest batch in a budget counts cache bytes only
(not weights or activations) at the longest length.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from ..cliargs import add_model
from ..errors import SlimWhisperError
from ..geometry import GEOMETRIES
from ..memory import cache_bytes_held, int8_cache_bytes, kv_cache_bytes
from .common import add_result_args, load_for_bench, run_metadata, write_result
from .decode import prepare_decode

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def kv_table(model: nn.Module, batches: list[int], lengths: list[int], dtype: torch.dtype) -> list[dict[str, int]]:
    """Analytic self/cross cache bytes at every (batch, length)."""
    rows = []
    for batch in batches:
        for length in lengths:
            b = kv_cache_bytes(model, batch=batch, tokens=length, dtype=dtype)
            rows.append({"batch": batch, "length": length, "self": b.self_attention, "cross": b.cross_attention,
                         "total": b.total})
    return rows


def max_batch(model: nn.Module, budget_bytes: int, length: int, dtype: torch.dtype) -> dict[str, int]:
    """Largest batch whose cache fits `budget_bytes` at `length` tokens: self attention only, and self + cross."""
    per_seq = kv_cache_bytes(model, batch=1, tokens=length, dtype=dtype)
    return {"self": budget_bytes // per_seq.self_attention, "self_cross": budget_bytes // per_seq.total}


@torch.inference_mode()
def held_vs_analytic(model: nn.Module, batch: int = 2, length: int = 16, encoder_frames: int = 1500) -> dict[str, Any]:
    """Bytes a prefilled cache holds against the formula, in the model's dtype (equal when the formula is right)."""
    stepper = prepare_decode(model, batch, length, encoder_frames)
    held = cache_bytes_held(stepper.cache)
    analytic = kv_cache_bytes(model, batch, length, next(model.parameters()).dtype, encoder_frames)
    return {
        "batch": batch,
        "length": length,
        "held_self": held.self_attention,
        "held_cross": held.cross_attention,
        "analytic_self": analytic.self_attention,
        "analytic_cross": analytic.cross_attention,
        "equal": held == analytic,
    }


def bench_kv(
    models: dict[str, nn.Module],
    batches: list[int],
    lengths: list[int],
    dtype: torch.dtype = torch.float16,
    budget_bytes: int = 2**30,
    check_held: bool = True,
) -> dict[str, Any]:
    """Per model: analytic table, bytes per token, largest batch in the budget at the longest length, held check."""
    longest = max(lengths)
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "budget_bytes": budget_bytes,
                              "budget_length": longest, "models": {}}
    for name, model in models.items():
        per_token = kv_cache_bytes(model, batch=1, tokens=1, dtype=dtype)
        entry = {
            "self_bytes_per_token": per_token.self_attention,
            "cross_bytes_per_frame": per_token.cross_attention // model.config.max_source_positions,
            "table": kv_table(model, batches, lengths, dtype),
            "max_batch_in_budget": max_batch(model, budget_bytes, longest, dtype),
        }
        int8 = int8_cache_bytes(model, batch=1, tokens=1)
        entry["int8_cache"] = {  # the engine's kv_cache="int8": int8 numbers plus float32 scales
            "self_bytes_per_token": int8.self_attention,
            "cross_bytes_per_frame": int8.cross_attention // model.config.max_source_positions,
            "max_batch_in_budget": budget_bytes // int8_cache_bytes(model, batch=1, tokens=longest).total,
        }
        if check_held:
            entry["held_check"] = held_vs_analytic(model)
        result["models"][name] = entry
    if "baseline" in models:
        base = result["models"]["baseline"]
        for name, entry in result["models"].items():
            if name != "baseline":
                entry["self_ratio_vs_baseline"] = entry["self_bytes_per_token"] / base["self_bytes_per_token"]
                entry["cross_ratio_vs_baseline"] = entry["cross_bytes_per_frame"] / base["cross_bytes_per_frame"]
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench kv`."""
    p = subparsers.add_parser("kv", help="KV-cache bytes vs batch and length, largest batch in a memory budget",
                              description=" ".join(__doc__.split("\n\n")[2].split()))
    add_model(p, required=False)
    p.add_argument("--baseline", help="model to compare against (e.g. the original)")
    p.add_argument("--geometry", choices=tuple(GEOMETRIES),
                   help="plan a released size without weights: the largest batch at 448 tokens that fits "
                   "--budget-gib, weights and activations counted, original against the --kv-reduction geometry")
    p.add_argument("--kv-reduction", type=float, default=0.875, help="with --geometry: the MLA reduction planned")
    p.add_argument("--modules", default="decoder_self,decoder_cross",
                   help="with --geometry: the converted modules (comma-separated)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 200, 448])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="cache dtype (default float16)")
    p.add_argument("--budget-gib", type=float, default=1.0, help="cache memory budget for the largest batch")
    p.add_argument("--no-held", action="store_true", help="skip checking the formula against a real cache")
    add_result_args(p)
    return p


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The geometry's memory plan: largest batch in the budget, original against compressed, fp16/int8 cache."""
    from ..geometry import memory_plan, planned_mla, whisper_config
    from ..mla import MLAConfig

    original = whisper_config(args.geometry)
    mla = MLAConfig(modules=tuple(m for m in args.modules.split(",") if m), kv_reduction=args.kv_reduction,
                    factorization="joint")
    budget, tokens = int(args.budget_gib * 2**30), max(args.lengths)
    out: dict[str, Any] = {"geometry": args.geometry, "budget_bytes": budget, "tokens": tokens,
                           "mla": mla.to_dict(), "plans": {}}
    for name, config in (("original", original), ("compressed", planned_mla(original, mla))):
        entry = {}
        for cache, width in (("fp16", 2), ("int8", 1)):
            p = memory_plan(config, tokens=tokens, cache_bytes=width)
            entry[cache] = {"largest_batch": p.largest_batch(budget), "weight_bytes": p.weight_bytes,
                            "cache_bytes_per_sequence": p.cache_bytes_per_sequence,
                            "activation_bytes_per_sequence": p.activation_bytes_per_sequence}
        out["plans"][name] = entry
    return out


def run_plan(args: argparse.Namespace) -> int:
    result = {**plan(args), **run_metadata()}
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, entry in result["plans"].items():
        print(f"{args.geometry} {name}: largest batch in {args.budget_gib:g} GiB at {result['tokens']} tokens: "
              f"{entry['fp16']['largest_batch']} (fp16 cache), {entry['int8']['largest_batch']} (int8 cache)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.geometry:
        return run_plan(args)
    if not args.model:
        raise SlimWhisperError("name a model (`slimwhisper bench kv tiny.en`) or a --geometry to plan")
    models = {"model": load_for_bench(args.model)}
    if args.baseline:
        models = {"baseline": load_for_bench(args.baseline), **models}
    result = bench_kv(models, args.batches, args.lengths, DTYPES[args.dtype], int(args.budget_gib * 2**30),
                      check_held=not args.no_held)
    result["names"] = {"model": args.model, **({"baseline": args.baseline} if args.baseline else {})}
    result.update(run_metadata())
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, entry in result["models"].items():
        fit = entry["max_batch_in_budget"]
        print(f"{name}: self {entry['self_bytes_per_token']} B/token, cross {entry['cross_bytes_per_frame']} B/frame "
              f"({args.dtype}); largest batch in {args.budget_gib:g} GiB at {max(args.lengths)} tokens: "
              f"{fit['self']} (self only), {fit['self_cross']} (self + cross), "
              f"{entry['int8_cache']['max_batch_in_budget']} (self + cross, int8 cache)")
    return 0
