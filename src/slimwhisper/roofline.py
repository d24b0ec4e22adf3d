"""Roofline of a decode step: the FLOPs it must do, the bytes it must move, and what this machine can do of each.

A step cannot take less than max(FLOPs / peak FLOP rate, bytes / memory bandwidth). Both peaks are
measured here (a large float32 matmul; a large tensor copy), so the bound is this machine's, and a
measured time divided by it says how close the step runs to what the hardware allows. Bytes come
from `memory.decode_step_traffic`.

FLOPs per decoder layer and row (one new token): every linear 2 x its weights; attention over T
cached positions reads, per head, the query against every key and mixes every value: 4 x H x h x T
for multi-head attention, 4 x H x (d_c + r) x T for MLA read from the latent (the heads share it,
so each head scores d_c + r numbers per position), plus its per-head absorb and expand products
(2 x H x (h - r) x d_c and 2 x H x h x d_c).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .mla.modules import WhisperMLAAttention


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one decode step for the whole batch: linears (incl. the LM head), self and cross attention."""

    linears: int
    self_attention: int
    cross_attention: int

    @property
    def total(self) -> int:
        return self.linears + self.self_attention + self.cross_attention


def attention_flops(attn: nn.Module, positions: int) -> int:
    """FLOPs of one query token of `attn` attending over `positions` cached positions (its linears excluded)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    if isinstance(attn, WhisperMLAAttention):
        r, d_c = attn.kept_dims, attn.latent_dim
        return 4 * heads * (d_c + r) * positions + 2 * heads * (head_dim - r) * d_c + 2 * heads * head_dim * d_c
    return 4 * heads * head_dim * positions


def _linear_weights(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Weights of the linears a step runs per row (MLA up-projections are counted as attention instead)."""
    from .engine.quantize import is_quantized_linear

    total = 0
    for m in module.modules():
        if any(m is s for s in skip):
            continue
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif is_quantized_linear(m):
            total += m.weight().numel()
    return total


def decode_step_flops(model: nn.Module, batch: int, cache_len: int, encoder_frames: int | None = None) -> StepFlops:
    """`StepFlops` of one decode step at `batch` rows with `cache_len` cached tokens (cross over the frames).

    Only the decoder's per-token work counts: the cross-attention latent or keys are computed once per window.
    """
    frames = model.config.max_source_positions if encoder_frames is None else encoder_frames
    decoder = model.model.decoder
    skip: list[nn.Module] = []
    self_flops = cross_flops = 0
    for layer in decoder.layers:
        self_flops += attention_flops(layer.self_attn, cache_len + 1)
        cross_flops += attention_flops(layer.encoder_attn, frames)
        for attn in (layer.self_attn, layer.encoder_attn):
            if isinstance(attn, WhisperMLAAttention):
                skip += [attn.up_k, attn.up_v]
        cross = layer.encoder_attn  # its key/value (or latent) projections run once per window, not per token
        skip += [m for m in (getattr(cross, "k_proj", None), getattr(cross, "v_proj", None),
                             getattr(cross, "kv_down", None), getattr(cross, "kept_proj", None)) if m is not None]
    linears = _linear_weights(decoder.layers, tuple(skip)) + _linear_weights(model.proj_out)
    return StepFlops(2 * batch * linears, batch * self_flops, batch * cross_flops)


@dataclass(frozen=True)
class MachinePeaks:
    """What this machine reaches: float32 matmul GFLOP/s and copy bandwidth GB/s (reads + writes)."""

    gflops: float
    gbps: float

    def bound_seconds(self, flops: float, nbytes: float) -> float:
        """The roofline: the slower of doing the FLOPs and moving the bytes."""
        return max(flops / (self.gflops * 1e9), nbytes / (self.gbps * 1e9))


def measure_peaks(size: int = 1536, copy_mib: int = 256, repeats: int = 5) -> MachinePeaks:
    """Best of `repeats`: a size^3 float32 matmul and a copy of `copy_mib` MiB, with torch's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    src = torch.empty(copy_mib * 2**18)
    dst = torch.empty_like(src)
    src.fill_(1.0)
    dst.copy_(src)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    gflops = 2 * size**3 / best(lambda: a @ b) / 1e9
    gbps = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src)) / 1e9
    return MachinePeaks(gflops, gbps)
