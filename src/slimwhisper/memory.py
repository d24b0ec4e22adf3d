"""Analytic KV-cache sizes: what a (compressed) Whisper decoder holds per batch and token.

Per decoder layer and token, an MHA module caches keys and values (2 * d_model numbers); an MLA
module caches its latent and kept key dims (d_c + heads * r). The cross-attention cache holds the
same per encoder frame (1500 per 30-s window), computed once per utterance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class KVCacheBytes:
    """Cache bytes of the decoder: self attention (grows with tokens) and cross attention (per utterance)."""

    self_attention: int
    cross_attention: int

    @property
    def total(self) -> int:
        return self.self_attention + self.cross_attention


def module_cached_numbers(d_model: int, latent_dim: int | None = None, kept_total: int = 0) -> int:
    """Numbers one attention module caches per position: 2 * d_model as MHA (latent_dim None), else d_c + kept dims."""
    return 2 * d_model if latent_dim is None else latent_dim + kept_total


def mla_geometries(config: PretrainedConfig, module: str) -> list[dict | None]:
    """Per decoder layer, the MLA geometry of its `module` ("self_attn" or "encoder_attn"), None where MHA."""
    layers = (getattr(config, "compression", None) or {}).get("mla", {}).get("layers", {})
    return [layers.get(f"model.decoder.layers.{i}.{module}") for i in range(config.decoder_layers)]


def cached_numbers_per_token(config: PretrainedConfig, module: str) -> int:
    """Numbers cached per token (self) or per encoder frame (cross), summed over decoder layers."""
    total = 0
    for geometry in mla_geometries(config, module):
        if geometry is None:
            total += module_cached_numbers(config.d_model)
        else:
            kept = sum(len(row) for row in geometry["kept_dims"])
            total += module_cached_numbers(config.d_model, geometry["latent_dim"], kept)
    return total


def cached_scales_per_token(config: PretrainedConfig, module: str) -> int:
    """Scales an int8 cache holds per token (self) or frame (cross), summed over layers: one per head for
    keys and for values (MHA), one for an MLA latent plus one per head for kept key dims (when it keeps any)."""
    heads = config.decoder_attention_heads
    total = 0
    for geometry in mla_geometries(config, module):
        if geometry is None:
            total += 2 * heads
        else:
            kept = len(geometry["kept_dims"][0]) if geometry["kept_dims"] else 0
            total += 1 + (heads if kept else 0)
    return total


def int8_cache_bytes(
    model_or_config: nn.Module | PretrainedConfig,
    batch: int = 1,
    tokens: int = 1,
    scale_dtype: torch.dtype = torch.float32,
    encoder_frames: int | None = None,
) -> KVCacheBytes:
    """Bytes the engine's int8 cache (`kv_cache="int8"`) holds: one byte per cached number plus its scales
    (in the model's float dtype: float32 on a CPU). The one layer of float scratch it attends from is not
    counted: it does not grow with the number of layers."""
    config = getattr(model_or_config, "config", model_or_config)
    scale = torch.empty((), dtype=scale_dtype).element_size()
    frames = config.max_source_positions if encoder_frames is None else encoder_frames

    def per(module: str) -> int:
        return cached_numbers_per_token(config, module) + scale * cached_scales_per_token(config, module)

    return KVCacheBytes(self_attention=batch * tokens * per("self_attn"),
                        cross_attention=batch * frames * per("encoder_attn"))


def kv_cache_bytes(
    model_or_config: nn.Module | PretrainedConfig,
    batch: int = 1,
    tokens: int = 1,
    dtype: torch.dtype = torch.float16,
    encoder_frames: int | None = None,
) -> KVCacheBytes:
    """Bytes the decoder caches for `batch` utterances after `tokens` decoder positions.

    Args:
        model_or_config: a (compressed) Whisper model or its config.
        dtype: cache dtype (fp16 is what a deployed model uses).
        encoder_frames: cross-attention length; defaults to the config's max_source_positions (1500).
    """
    config = getattr(model_or_config, "config", model_or_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    frames = config.max_source_positions if encoder_frames is None else encoder_frames
    self_bytes = batch * tokens * cached_numbers_per_token(config, "self_attn") * itemsize
    cross_bytes = batch * frames * cached_numbers_per_token(config, "encoder_attn") * itemsize
    return KVCacheBytes(self_attention=self_bytes, cross_attention=cross_bytes)


def cache_bytes_held(cache) -> KVCacheBytes:
    """Bytes actually held by an `EncoderDecoderCache` (self, cross), for checking the formula; the engine's
    layers count themselves (`nbytes`: an int8 layer's scales included)."""

    def held(dynamic) -> int:
        return sum(
            layer.nbytes() if hasattr(layer, "nbytes") else sum(
                t.numel() * t.element_size()
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor)
            )
            for layer in dynamic.layers
        )

    return KVCacheBytes(held(cache.self_attention_cache), held(cache.cross_attention_cache))


@dataclass(frozen=True)
class StepTraffic:
    """The least memory traffic of one decode step, in bytes: what a memory-bound step's time follows.

    A step reads every decoder weight once (shared by the batch), the whole self-attention cache
    (3 times when the cache grows by concatenation: attention reads it, and the concatenation reads
    the old copy and writes the new one) and the cross-attention cache once.
    """

    weights: int
    self_cache: int
    cross_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.self_cache + self.cross_cache


def decoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: decoder layers, final norm and LM head.

    Token and position embeddings are skipped (a step reads one row of each), unless tied to the LM
    head, which reads all of it. Dynamic int8 linears count one byte per weight.
    """
    from .engine.quantize import is_quantized_linear

    decoder = model.model.decoder
    modules = [*decoder.layers.modules(), decoder.layer_norm, model.proj_out]
    seen, total = set(), 0
    for module in modules:
        if is_quantized_linear(module):
            # its packed weight is unpacked into a fresh tensor per call (never tied)
            bias = module.bias()
            total += module.weight().numel() + (0 if bias is None else bias.numel() * bias.element_size())
            continue
        for t in module.parameters(recurse=False):
            key = (t.data_ptr(), t.numel())  # tied weights (LM head = token embedding) count once
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def decode_step_traffic(
    model: nn.Module,
    batch: int,
    cache_len: int,
    dtype: torch.dtype = torch.float32,
    encoder_frames: int | None = None,
    concatenated: bool = True,
) -> StepTraffic:
    """`StepTraffic` of one decode step at `batch` rows with `cache_len` cached tokens.

    `concatenated`: the self-attention cache grows by concatenation (Hugging Face's `DynamicCache`)
    rather than being written in place (a static cache).
    """
    kv = kv_cache_bytes(model, batch, cache_len, dtype, encoder_frames)
    return StepTraffic(decoder_weight_bytes(model), kv.self_attention * (3 if concatenated else 1), kv.cross_attention)
