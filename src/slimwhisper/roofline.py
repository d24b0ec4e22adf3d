"""Rooflines of a decode step and of an encoder pass: the FLOPs each must do, the bytes each must move, and what
this machine can do of each.

A step cannot take less than max(FLOPs / peak FLOP rate, bytes / memory bandwidth). Both peaks are
measured here (a large float32 matmul; a large tensor copy; for int8 runs also a large dynamic int8
linear), so the bound is this machine's, and a measured time divided by it says how close the step runs
to what the hardware allows. Bytes of a decode step come from `memory.decode_step_traffic`.

FLOPs per decoder layer and row (one new token): every linear 2 x its weights; attention over T
cached positions reads, per head, the query against every key and mixes every value: 4 x H x h x T
for multi-head attention, 4 x H x (d_c + r) x T for MLA read from the latent (the heads share it,
so each head scores d_c + r numbers per position), plus its per-head absorb and expand products
(2 x H x (h - r) x d_c and 2 x H x h x d_c).

An encoder pass (`encoder_flops`, `encoder_bytes`) over B 30-s windows: the two convolutions of the
front end (2 x out x in x kernel x output length each), every linear at 2 x B x L x its weights (L =
1500 positions; a `LowRankLinear` of rank k is 2 x B x L x k x (in + out)), and self-attention at
2 x B x L^2 x d for the scores and as much for the values, or, where `WhisperLowRankAttention.reduced_plan`
says the module works in its rank space, the "scores_reduced" / "values_reduced" terms of
`lowrank.math.attention_flops` (which then include the up-projections that path folds in, so those are
not counted as linears). Layer norms, GELU, residual adds and the position embedding are elementwise,
under 1% of the FLOPs, and not counted. Least bytes: every encoder weight once at its storage size
(an int8 linear one byte per weight), the input features read once, and each stage's (conv1, conv2,
every encoder layer, the final layer norm) input read and output written once at the activation dtype;
a layer's intermediates (q, k, v, the MLP's hidden) are assumed to stay in cache, so this is a floor
that the real traffic exceeds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .lowrank.math import attention_flops as lowrank_attention_flops
from .lowrank.modules import LowRankLinear, WhisperLowRankAttention
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
class EncoderFlops:
    """FLOPs of one encoder pass over the whole batch, by part (see the module docstring)."""

    conv: int
    linear_dense: int
    linear_lowrank: int
    attention: int
    # of the linears' FLOPs, those in dynamic int8 linears (the rest stay float: see `engine.quantize`); the
    # same work either way, so it is not part of the comparison
    int8: int = field(default=0, compare=False)

    @property
    def linears(self) -> int:
        return self.linear_dense + self.linear_lowrank

    @property
    def total(self) -> int:
        return self.conv + self.linears + self.attention

    def parts(self) -> dict[str, int]:
        """{"conv", "linear_dense", "linear_lowrank", "attention"}: FLOPs, named as the parts of a profile."""
        return {"conv": self.conv, "linear_dense": self.linear_dense, "linear_lowrank": self.linear_lowrank,
                "attention": self.attention}


def conv_output_length(conv: nn.Conv1d, length: int) -> int:
    """Output length of a 1-d convolution over `length` input frames."""
    (kernel,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
    padding = conv.padding[0] if isinstance(conv.padding, tuple) else 0
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def linear_weights(module: nn.Module) -> int | None:
    """in x out of an `nn.Linear` or a dynamic int8 linear, else None."""
    from .engine.quantize import is_quantized_linear

    if isinstance(module, nn.Linear):
        return module.weight.numel()
    if is_quantized_linear(module):
        return module.weight().numel()
    return None


def _encoder(model: nn.Module) -> nn.Module:
    return model.get_encoder() if hasattr(model, "get_encoder") else model


def encoder_flops(model: nn.Module, batch: int = 1) -> EncoderFlops:
    """`EncoderFlops` of one pass of `model`'s encoder over `batch` 30-s windows (2 x max_source_positions mel
    frames), each attention counted on the path it takes at that length (see the module docstring)."""
    from .engine.quantize import is_quantized_linear

    encoder = _encoder(model)
    length = 2 * encoder.config.max_source_positions
    conv = 0
    for c in (encoder.conv1, encoder.conv2):
        length = conv_output_length(c, length)
        conv += 2 * c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] * length
    halves = {id(half) for m in encoder.modules() if isinstance(m, LowRankLinear) for half in (m.down, m.up)}
    folded: set[int] = set()  # up-projections the rank-space attention folds into its attention terms
    attention = 0
    for layer in encoder.layers:
        attn = layer.self_attn
        d = attn.num_heads * attn.head_dim
        scores, values = attn.reduced_plan(length) if isinstance(attn, WhisperLowRankAttention) else (False, False)
        ranks = [p.rank if isinstance(p, LowRankLinear) else d for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        terms = lowrank_attention_flops(length, attn.num_heads, attn.head_dim, *ranks)
        attention += terms["scores_reduced"] if scores else 2 * length * length * d
        attention += terms["values_reduced"] if values else 2 * length * length * d
        if scores:
            folded |= {id(attn.q_proj.up), id(attn.k_proj.up)}
        if values:
            folded.add(id(attn.v_proj.up))
    dense = lowrank = int8 = 0
    for m in encoder.layers.modules():
        weights = linear_weights(m)
        if weights is None or id(m) in folded:
            continue
        if id(m) in halves:
            lowrank += 2 * length * weights
        else:
            dense += 2 * length * weights
        if is_quantized_linear(m):
            int8 += 2 * length * weights
    return EncoderFlops(batch * conv, batch * dense, batch * lowrank, batch * attention, batch * int8)


@dataclass(frozen=True)
class EncoderBytes:
    """Least bytes of one encoder pass: weights once, and activations in and out of every stage."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def encoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of every encoder weight at its storage size (a dynamic int8 linear: one byte per weight and its
    float bias); the position embedding counts whole, as a 30-s pass reads every row."""
    from .engine.quantize import is_quantized_linear

    total = 0
    for module in _encoder(model).modules():
        if is_quantized_linear(module):
            bias = module.bias()
            total += module.weight().numel() + (0 if bias is None else bias.numel() * bias.element_size())
            continue
        total += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
        total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
    return total


def encoder_bytes(model: nn.Module, batch: int = 1) -> EncoderBytes:
    """`EncoderBytes` of one pass over `batch` 30-s windows; activations at the dtype of the first conv's weight
    (float32 for an int8 model: its activations stay float). See the module docstring."""
    encoder = _encoder(model)
    item = encoder.conv1.weight.element_size()
    frames = 2 * encoder.config.max_source_positions
    mid = conv_output_length(encoder.conv1, frames)
    positions = conv_output_length(encoder.conv2, mid)
    d = encoder.config.d_model
    # conv1 in; conv1 out and conv2 in; conv2 out; every layer's and the final norm's in and out
    numbers = encoder.conv1.in_channels * frames + 2 * encoder.conv1.out_channels * mid + d * positions
    numbers += (len(encoder.layers) + 1) * 2 * positions * d
    return EncoderBytes(encoder_weight_bytes(model), batch * numbers * item)


@dataclass(frozen=True)
class MachinePeaks:
    """What this machine reaches: float32 matmul GFLOP/s, copy bandwidth GB/s (reads + writes) and, when
    measured, a dynamic int8 linear's GFLOP/s (torch's CPU kernel, the engine's int8 linears)."""

    gflops: float
    gbps: float
    int8_gflops: float | None = None

    def bound_seconds(self, flops: float, nbytes: float) -> float:
        """The roofline: the slower of doing the FLOPs and moving the bytes."""
        return max(flops / (self.gflops * 1e9), nbytes / (self.gbps * 1e9))

    def compute_seconds(self, flops: float, int8_flops: float = 0.0) -> float:
        """Least time for `flops` float32 FLOPs and `int8_flops` FLOPs in int8 linears (at the int8 rate when
        measured, else at the float32 rate)."""
        int8_rate = self.int8_gflops or self.gflops
        return flops / (self.gflops * 1e9) + int8_flops / (int8_rate * 1e9)


def encoder_roofline(model: nn.Module, batch: int, measured_ms: float, peaks: MachinePeaks) -> dict[str, object]:
    """One encoder pass of `model` on the roofline: FLOPs by part, least bytes, the bound max(compute time,
    bytes / bandwidth) on `peaks`, which of the two binds, the share of the bound `measured_ms` reaches and the
    GFLOP/s it achieves. The FLOPs of int8 linears count at the int8 rate (`peaks.int8_gflops`), the rest at
    the float32 rate."""
    flops = encoder_flops(model, batch)
    nbytes = encoder_bytes(model, batch)
    compute_s = peaks.compute_seconds(flops.total - flops.int8, flops.int8)
    memory_s = nbytes.total / (peaks.gbps * 1e9)
    bound_ms = max(compute_s, memory_s) * 1e3
    return {
        "gflop": flops.total / 1e9,
        "gflop_parts": {k: v / 1e9 for k, v in flops.parts().items()},
        "mbytes": nbytes.total / 1e6,
        "mbytes_weights": nbytes.weights / 1e6,
        "int8_linears": flops.int8 > 0,
        "bound_ms": bound_ms,
        "bound_by": "compute" if compute_s > memory_s else "memory",
        "attained": bound_ms / measured_ms,
        "gflops_achieved": flops.total / (measured_ms * 1e6),
    }


def measure_peaks(size: int = 1536, copy_mib: int = 256, repeats: int = 5, int8: bool = False) -> MachinePeaks:
    """Best of `repeats`: a size^3 float32 matmul and a copy of `copy_mib` MiB, with torch's current threads;
    with `int8`, also a dynamic int8 linear as `engine.quantize.quantize_dynamic_int8` makes it, on a [size, size]
    input (its input's quantisation included)."""
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
    int8_gflops = None
    if int8:
        from .engine.quantize import quantize_dynamic_int8

        with torch.inference_mode():
            linear = quantize_dynamic_int8(nn.Sequential(nn.Linear(size, size, bias=False)))[0]
            int8_gflops = 2 * size**3 / best(lambda: linear(a)) / 1e9
    return MachinePeaks(gflops, gbps, int8_gflops)
