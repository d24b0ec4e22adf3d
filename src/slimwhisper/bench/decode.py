"""Decode speed: wall time of one decoder step with a cache of fixed length, a compressed model against a baseline.

`slimwhisper bench decode MODEL --baseline MODEL --batch 32 --cache-len 400 --json`

**ms_per_token** is the median wall time, in milliseconds, of one decode step *for the whole batch*:
the decoder forward on one new token per sequence plus the LM head, with a self-attention cache
already holding `cache_len` tokens per sequence and cross-attention over a real-sized encoder output
(1500 frames, cached as in generation). It is what a user waits per generated token; tokens per
second for the batch is `batch * 1000 / ms_per_token`.

Method: the cache is prefilled once per model (batch 1, then repeated to the batch, so only steps
are timed); after every timed step the cache is cropped back to `cache_len`. Models are timed in
turns (A B A B ...) after a warm-up and the medians compared, so machine noise hits all of them.
Cache kinds: "dynamic" is Hugging Face's `DynamicCache` (concatenates the whole cache every step,
as `generate` does); "static" is the transcription engine's own `engine.cache.StaticLayer`: writes
into preallocated buffers and hands attention length-sliced views. "engine" times the transcription
engine's own decode step (`engine.decode.DecoderRunner`: its static cache, fused projections and,
on a CPU, its own cross-attention), i.e. what `Transcriber` users get per token. `--quantize int8` times both
models with the engine's int8 linears; MLA models decode absorbed, folding the up-projections into
q_proj/out_proj where docs/mla.md (folding) says it is cheaper (`--fold` forces it), and a model that folds gets
a "model_unfolded" entry too.

`roofline` gives each entry's FLOPs and least bytes per step, this machine's measured float32 matmul rate
and copy bandwidth, the bound max(FLOPs / rate, bytes / bandwidth), which of the two binds, and the share
of that bound the measured step reaches (`slimwhisper.roofline`). `traffic` puts the timings next to
the least bytes a step must move (`memory.decode_step_traffic`:
weights, the self-attention cache, three times over for a concatenated cache, and the cross cache)
and the speedup those bytes would allow a memory-bound step ("bound_speedup"): at large batch the
cross-attention cache is most of it, so shrinking only the self-attention cache buys little.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from ..cliargs import add_batch_size, add_model
from ..engine.cache import KV_CACHE_KINDS, StaticEncoderDecoderCache, StaticLayer
from ..engine.decode import DecoderRunner
from ..engine.quantize import QUANTIZE_CHOICES, quantize
from ..errors import SlimWhisperError
from ..memory import cache_bytes_held, decode_step_traffic, int8_cache_bytes, kv_cache_bytes
from ..mla.modules import FOLD_MODES, WhisperMLAAttention, set_decode_mode
from ..roofline import decode_step_flops, measure_peaks
from .common import add_model_run_args, finish_model_run, interleaved_times, load_for_bench, median_ms, set_threads

CACHE_KINDS = ("dynamic", "static", "engine")
DEFINITION = (
    "ms_per_token = median wall time (ms) of one decoder step for the whole batch (decoder forward on one new "
    "token per sequence + LM head) with cache_len cached tokens and cross-attention over encoder_frames frames"
)


def to_static(cache: EncoderDecoderCache, capacity: int) -> EncoderDecoderCache:
    """A copy of `cache` whose self-attention layers are the engine's preallocated buffers (cross cache shared)."""
    layers = [StaticLayer.holding(layer.keys, layer.values, capacity) for layer in cache.self_attention_cache.layers]
    return EncoderDecoderCache(Cache(layers=layers), cache.cross_attention_cache)


def is_mla(model: nn.Module) -> bool:
    return any(isinstance(m, WhisperMLAAttention) and m.is_decoder for m in model.modules())


@dataclass
class DecodeStepper:
    """One model with a prefilled cache of `cache_len` tokens; `step()` decodes one token and crops back."""

    model: nn.Module
    cache: EncoderDecoderCache
    encoder_states: torch.Tensor
    tokens: torch.Tensor
    cache_len: int

    def step(self) -> torch.Tensor:
        logits = self.model(
            encoder_outputs=(self.encoder_states,),
            decoder_input_ids=self.tokens,
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        self.cache.self_attention_cache.crop(self.cache_len - self.cache.get_seq_length())
        return logits


@dataclass
class EngineStepper:
    """The engine's decode step on a cache prefilled with `cache_len` tokens; `step()` decodes one and crops back."""

    runner: DecoderRunner
    cache: StaticEncoderDecoderCache
    encoder_states: torch.Tensor
    tokens: torch.Tensor
    cache_len: int

    def step(self) -> torch.Tensor:
        logits = self.runner(self.tokens, self.cache, self.encoder_states)
        self.cache.self_attention_cache.crop(self.cache_len - self.cache.get_seq_length())
        return logits


@torch.inference_mode()
def prepare_engine_decode(model: nn.Module, batch: int, cache_len: int, encoder_frames: int | None = None,
                          seed: int = 0, kv_cache: str = "float") -> EngineStepper:
    """An `EngineStepper` for `model` (its MLA modules' current fold setting is fused into the runner)."""
    config = model.config
    frames = config.max_source_positions if encoder_frames is None else encoder_frames
    param = next(p for p in model.parameters() if p.is_floating_point())
    gen = torch.Generator().manual_seed(seed)
    encoder_states = torch.randn(1, frames, config.d_model, generator=gen).to(param.device, param.dtype)
    encoder_states = encoder_states.expand(batch, -1, -1).contiguous()
    prompt = torch.randint(0, config.vocab_size, (1, cache_len), generator=gen).expand(batch, -1).to(param.device)
    runner = DecoderRunner(model, kv_cache=kv_cache)
    cache = runner.new_cache(batch, cache_len + 1, param.dtype)
    runner(prompt, cache, encoder_states)
    tokens = torch.randint(0, config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed + 1))
    return EngineStepper(runner, cache, encoder_states, tokens.to(param.device), cache_len)


@torch.inference_mode()
def prepare_decode(
    model: nn.Module,
    batch: int,
    cache_len: int,
    encoder_frames: int | None = None,
    cache: str = "dynamic",
    seed: int = 0,
    shared: DecodeStepper | None = None,
) -> DecodeStepper:
    """Prefill `model`'s cache with `cache_len` random tokens over a random encoder output, repeated to `batch`.

    Args:
        encoder_frames: encoder output length (default the model's max_source_positions, 1500 = 30 s).
        cache: "dynamic" or "static" (see the module docstring).
        shared: a stepper of the same model whose prefill to reuse (e.g. its dynamic twin for "static").
    """
    if cache not in CACHE_KINDS:
        raise SlimWhisperError(f"unknown cache kind {cache!r}; choose from {', '.join(CACHE_KINDS)}")
    if cache == "engine":
        raise SlimWhisperError("the engine's decode step is prepared by prepare_engine_decode")
    config = model.config
    frames = config.max_source_positions if encoder_frames is None else encoder_frames
    if batch < 1 or cache_len < 1:
        raise SlimWhisperError(f"batch and cache length must be >= 1 (got batch={batch}, cache_len={cache_len})")
    if cache_len + 1 > config.max_target_positions:
        raise SlimWhisperError(
            f"cache length {cache_len} + 1 new token exceeds the decoder's {config.max_target_positions} positions"
        )
    param = next(model.parameters())
    if shared is not None:
        prefilled = shared.cache
        encoder_states = shared.encoder_states
    else:
        gen = torch.Generator().manual_seed(seed)
        encoder_one = torch.randn(1, frames, config.d_model, generator=gen).to(param.device, param.dtype)
        prompt = torch.randint(0, config.vocab_size, (1, cache_len), generator=gen).to(param.device)
        prefilled = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model(encoder_outputs=(encoder_one,), decoder_input_ids=prompt, past_key_values=prefilled, use_cache=True)
        prefilled.batch_repeat_interleave(batch)
        encoder_states = encoder_one.expand(batch, -1, -1)  # unused after prefill: the cross cache is reused
    if cache == "static":
        prefilled = to_static(prefilled, cache_len + 1)
    tokens = torch.randint(0, config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed + 1))
    return DecodeStepper(model, prefilled, encoder_states, tokens.to(param.device), cache_len)


def _mode_switch(model: nn.Module, mode: str, fold: str | None = None) -> Callable[[], None]:
    return lambda: set_decode_mode(model, mode, fold)


def folds_anything(model: nn.Module, fold: str) -> bool:
    """Whether decoding with `fold` folds any MLA projection of `model` (docs/mla.md, folding)."""
    return any(any(m.fold_plan(fold)) for m in model.modules() if isinstance(m, WhisperMLAAttention))


def time_decode(
    models: Mapping[str, nn.Module],
    batch: int = 32,
    cache_len: int = 400,
    repeats: int = 10,
    warmup: int = 2,
    caches: tuple[str, ...] = ("dynamic",),
    materialized: bool = True,
    encoder_frames: int | None = None,
    baseline: str | None = "baseline",
    progress: bool = False,
    fold: str = "auto",
    roofline: bool = True,
    kv_cache: str = "float",
) -> dict[str, Any]:
    """Time decode steps of every model in `models` in one interleaved run; see the module docstring.

    Entries are the names in `models` (MLA models in their default absorbed decode); for MLA models
    `materialized` adds "<name>_materialized" (K/V rebuilt from the latent every step); every cache
    kind after the first in `caches` adds entries suffixed "_<kind>". MLA entries decode with `fold`
    ("auto", "never" or "always"; docs/mla.md, folding); when that folds any projection, "<name>_unfolded" adds
    the same model never folding, for comparison. Returns a JSON-able dict with
    `ms_per_token` per entry, `speedup` (the `baseline` entry's time / entry's), `tokens_per_s`,
    per-repeat times and the cache bytes held (and predicted by `slimwhisper.memory`) per model, and with
    `roofline` each entry's FLOPs, bytes and roofline bound on this machine (`roofline_of`). `kv_cache`
    ("int8") gives the engine entries the engine's int8 cache.
    """
    if not caches:
        raise SlimWhisperError("give at least one cache kind")
    entries = _Entries(batch, cache_len, encoder_frames, fold, materialized, kv_cache)
    for name, m in models.items():
        entries.add_model(name, m, caches)
    times = _time_entries(models, entries, repeats, warmup, progress)
    ms = {key: median_ms(t) for key, t in times.items()}
    result: dict[str, Any] = {"ms_per_token": ms, **_speedups(ms, caches, baseline), **_rates(times, ms, batch)}
    first_model = next(iter(models.values()))
    dtype = next(first_model.parameters()).dtype
    result["cache_bytes"] = _cache_bytes(models, entries.steppers, batch, cache_len, dtype, encoder_frames,
                                         kv_cache if caches[0] == "engine" else "float")
    result["traffic"] = traffic_bound(models, caches, batch, cache_len, dtype, encoder_frames, baseline)
    if roofline:
        result["roofline"] = roofline_of(models, ms, result["traffic"]["bytes_per_step"], caches, batch,
                                         cache_len, encoder_frames)
    result.update(
        batch=batch,
        cache_len=cache_len,
        encoder_frames=encoder_frames or first_model.config.max_source_positions,
        caches=list(caches),
        fold=fold,
        repeats=repeats,
        warmup=warmup,
        definition=DEFINITION,
    )
    return result


@dataclass
class _Entries:
    """The timed entries in output order: a stepper per entry and the decode mode each needs set before its steps."""

    batch: int
    cache_len: int
    encoder_frames: int | None
    fold: str
    materialized: bool
    kv_cache: str = "float"
    steppers: dict[str, DecodeStepper | EngineStepper] = field(default_factory=dict)
    before: dict[str, Callable[[], None]] = field(default_factory=dict)

    def add_model(self, name: str, m: nn.Module, caches: tuple[str, ...]) -> None:
        """One entry per cache kind ("_<kind>" after the first), each followed by the model's MLA variants."""
        first = None
        for i, kind in enumerate(caches):
            suffix = f"_{kind}" if i else ""
            if kind == "engine":  # the runner fuses the fold plan when it is built: one runner per plan
                if is_mla(m):
                    set_decode_mode(m, "absorbed", self.fold)
                stepper = prepare_engine_decode(m, self.batch, self.cache_len, self.encoder_frames,
                                                kv_cache=self.kv_cache)
            else:
                stepper = prepare_decode(m, self.batch, self.cache_len, self.encoder_frames, kind, shared=first)
                first = first or stepper
            self.steppers[name + suffix] = stepper
            if is_mla(m):
                self._add_mla_variants(name, suffix, m, kind, stepper)

    def _add_mla_variants(self, name: str, suffix: str, m: nn.Module, kind: str,
                          stepper: DecodeStepper | EngineStepper) -> None:
        """Absorbed decode with `fold` for the entry itself, plus its "_unfolded" and "_materialized" twins."""
        fold = self.fold
        self.before[name + suffix] = _mode_switch(m, "absorbed", fold)
        if fold != "never" and folds_anything(m, fold):
            unfolded = stepper
            if kind == "engine":
                set_decode_mode(m, "absorbed", "never")
                unfolded = prepare_engine_decode(m, self.batch, self.cache_len, self.encoder_frames,
                                                 kv_cache=self.kv_cache)
            self.steppers[f"{name}_unfolded{suffix}"] = unfolded
            self.before[f"{name}_unfolded{suffix}"] = _mode_switch(m, "absorbed", "never")
        if self.materialized:
            self.steppers[f"{name}_materialized{suffix}"] = stepper
            self.before[f"{name}_materialized{suffix}"] = _mode_switch(m, "materialized")


def _time_entries(models: Mapping[str, nn.Module], entries: _Entries, repeats: int, warmup: int,
                  progress: bool) -> dict[str, list[float]]:
    """Seconds per step of every entry, timed in turns; the MLA models are left in their default decode mode."""
    first_model = next(iter(models.values()))
    with torch.inference_mode():
        fns = {key: s.step for key, s in entries.steppers.items()}
        device = next(first_model.parameters()).device
        times = interleaved_times(fns, repeats, warmup, device=device, progress=progress, before=entries.before)
    for m in models.values():
        if is_mla(m):
            set_decode_mode(m, "absorbed", "auto")
    return times


def _rates(times: Mapping[str, list[float]], ms: Mapping[str, float], batch: int) -> dict[str, dict]:
    """Throughput, fastest and per-repeat times and their spread, per entry."""
    return {
        "tokens_per_s": {key: batch * 1e3 / v for key, v in ms.items()},
        # interference only ever adds time, so the fastest repeat is a second, load-robust estimate
        "min_ms_per_token": {key: min(t) * 1e3 for key, t in times.items()},
        "times_ms": {key: [round(x * 1e3, 3) for x in t] for key, t in times.items()},
        "spread_ms": {key: statistics.pstdev(t) * 1e3 for key, t in times.items()},
    }


def _same_cache_ref(key: str, caches: tuple[str, ...], baseline: str | None) -> str | None:
    """The baseline entry on the same kind of cache as `key` ("model_static" -> "baseline_static")."""
    kind = next((k for k in caches[1:] if key.endswith(f"_{k}")), None)
    return f"{baseline}_{kind}" if kind else baseline


def _speedups(ms: dict[str, float], caches: tuple[str, ...], baseline: str | None) -> dict[str, Any]:
    """The "speedup" of every entry over the baseline entry, and its "speedup_same_cache" over the baseline
    on the same cache kind; nothing when there is no baseline entry."""
    if baseline not in ms:
        return {}
    same = {}
    for key, v in ms.items():
        ref = _same_cache_ref(key, caches, baseline)
        if key != ref and ref in ms:
            same[key] = ms[ref] / v
    return {"speedup": {key: ms[baseline] / v for key, v in ms.items() if key != baseline},
            "speedup_same_cache": same}


def _cache_bytes(models: Mapping[str, nn.Module], steppers: Mapping[str, DecodeStepper | EngineStepper], batch: int,
                 cache_len: int, dtype: torch.dtype, encoder_frames: int | None, kv_cache: str = "float"
                 ) -> dict[str, dict[str, int]]:
    """Cache bytes each model's first entry holds, next to what `slimwhisper.memory` predicts (`kv_cache` is
    the first entry's cache storage)."""
    out = {}
    for name, m in models.items():
        held = cache_bytes_held(steppers[name].cache)
        analytic = (int8_cache_bytes(m, batch, cache_len, dtype, encoder_frames) if kv_cache == "int8"
                    else kv_cache_bytes(m, batch, cache_len, dtype, encoder_frames))
        out[name] = {
            "held_self": held.self_attention,
            "held_cross": held.cross_attention,
            "analytic_self": analytic.self_attention,
            "analytic_cross": analytic.cross_attention,
        }
    return out


def roofline_of(models: Mapping[str, nn.Module], ms: Mapping[str, float], traffic: Mapping[str, dict],
                caches: tuple[str, ...], batch: int, cache_len: int, encoder_frames: int | None) -> dict[str, Any]:
    """Per entry: FLOPs and least bytes of its step, the roofline bound on this machine's measured peaks
    (`slimwhisper.roofline`), which of the two binds, and the share of the bound the measured step reaches."""
    peaks = measure_peaks()
    out: dict[str, Any] = {"machine": {"gflops": peaks.gflops, "gbps": peaks.gbps}, "entries": {}}
    step_flops = {name: decode_step_flops(m, batch, cache_len, encoder_frames).total for name, m in models.items()}
    for key, measured in ms.items():
        name = next(n for n in sorted(models, key=len, reverse=True) if key == n or key.startswith(n + "_"))
        kind_bytes = traffic[_same_cache_ref(key, caches, name)]  # the model's own entry on this cache kind
        flops = step_flops[name]
        bound = peaks.bound_seconds(flops, kind_bytes["total"]) * 1e3
        out["entries"][key] = {
            "gflop": flops / 1e9, "mbytes": kind_bytes["total"] / 1e6, "bound_ms": bound,
            "bound_by": "compute" if flops / peaks.gflops > kind_bytes["total"] / peaks.gbps else "memory",
            "attained": bound / measured, "gflops_achieved": flops / (measured * 1e6),
        }
    return out


def traffic_bound(
    models: Mapping[str, nn.Module],
    caches: tuple[str, ...],
    batch: int,
    cache_len: int,
    dtype: torch.dtype,
    encoder_frames: int | None,
    baseline: str | None,
) -> dict[str, Any]:
    """Least bytes per step of each model and cache kind, and the speedup a memory-bound step could reach.

    A decode step at large batch streams the cross-attention cache, the self-attention cache and the
    weights; if its time followed those bytes, the baseline's bytes / a model's bytes is the most a
    smaller cache can buy. Measured speedups far below it point at overhead; the bound itself says
    what shrinking only the self-attention cache can ever give while the cross cache dominates.
    """
    out: dict[str, Any] = {"bytes_per_step": {}, "bound_speedup": {}}
    for name, m in models.items():
        for i, kind in enumerate(caches):
            t = decode_step_traffic(m, batch, cache_len, dtype, encoder_frames, concatenated=kind == "dynamic")
            out["bytes_per_step"][name + (f"_{kind}" if i else "")] = {
                "weights": t.weights, "self_cache": t.self_cache, "cross_cache": t.cross_cache, "total": t.total,
            }
    per_step = out["bytes_per_step"]
    for key, entry in per_step.items():
        ref = _same_cache_ref(key, caches, baseline)
        if key != ref and ref in per_step:
            out["bound_speedup"][key] = per_step[ref]["total"] / entry["total"]
    return out


def bench_decode(
    model: nn.Module, baseline: nn.Module | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`time_decode` of a model ("model") against an optional baseline ("baseline"); kwargs as there."""
    models = {"baseline": baseline, "model": model} if baseline is not None else {"model": model}
    return time_decode(models, **kwargs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench decode`."""
    p = subparsers.add_parser(
        "decode",
        help="ms per decode step of a model against a baseline, at a given batch and cache length",
        description=" ".join(__doc__.split("\n\n")[2].split()),
    )
    add_model(p)
    p.add_argument("--baseline", help="model to compare against in the same run (e.g. the original)")
    add_batch_size(p, 32, "rows decoded together")
    p.add_argument("--cache-len", type=int, default=400, help="tokens already in the self-attention cache")
    p.add_argument("--encoder-frames", type=int, help="cross-attention length (default 1500 = 30 s)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cache", choices=(*CACHE_KINDS, "both", "all"), default="dynamic",
                   help="dynamic (HF DynamicCache, as generate), static (preallocated buffers), both of those, "
                   "engine (the Transcriber's own decode step) or all three")
    p.add_argument("--no-materialized", action="store_true", help="skip the MLA materialised-decode entry")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantise both models as the engine does (int8 linears, CPU) before timing")
    p.add_argument("--kv-cache", choices=KV_CACHE_KINDS, default="float",
                   help="engine entries: float cache (default) or the engine's int8 cache")
    p.add_argument("--fold", choices=FOLD_MODES, default="auto",
                   help="fold MLA up-projections into q_proj/out_proj: auto (if cheaper, docs/mla.md), never, always")
    add_model_run_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    model = load_for_bench(args.model, args.device, args.dtype)
    baseline = load_for_bench(args.baseline, args.device, args.dtype) if args.baseline else None
    if args.quantize:
        model = quantize(model, args.quantize)
        baseline = quantize(baseline, args.quantize) if baseline is not None else None
    caches = {"both": ("dynamic", "static"), "all": CACHE_KINDS}.get(args.cache, (args.cache,))
    result = bench_decode(
        model, baseline, batch=args.batch_size, cache_len=args.cache_len, repeats=args.repeats, warmup=args.warmup,
        caches=caches, materialized=not args.no_materialized, encoder_frames=args.encoder_frames,
        progress=not args.json, fold=args.fold, kv_cache=args.kv_cache,
    )
    result["quantize"], result["kv_cache"] = args.quantize, args.kv_cache
    if not finish_model_run(result, args, threads):
        for key, ms in result["ms_per_token"].items():
            speed = result.get("speedup", {}).get(key)
            bound = result["traffic"]["bound_speedup"].get(key)
            roof = result["roofline"]["entries"][key]
            print(f"{key:>28}: {ms:8.2f} ms/step  {result['tokens_per_s'][key]:8.1f} tok/s"
                  + (f"  {speed:.2f}x vs baseline" if speed else "")
                  + (f" (memory-traffic bound {bound:.2f}x)" if bound else "")
                  + f"  roofline {roof['bound_ms']:.2f} ms ({roof['bound_by']}), {100 * roof['attained']:.0f}% of it")
    return 0
