"""Whisper's published geometries, and what a batch of them needs in memory, without any weights.

`whisper_config("large-v3")` is the exact architecture of a released size (layers can be cut for fast
tests); `planned_mla(config, mla)` is the config an MLA conversion of it would write (shapes only: the
geometry needs no calibration); `memory_plan` counts weights, caches and activations of a batch, so
`slimwhisper bench kv --geometry large-v3 --budget-gib 24` can say what fits before anyone has the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import WhisperConfig

from .errors import SlimWhisperError

# d_model, heads, encoder layers, decoder layers, mel bins, vocabulary (openai-whisper's model dimensions)
GEOMETRIES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny.en": (384, 6, 4, 4, 80, 51864),
    "tiny": (384, 6, 4, 4, 80, 51865),
    "base.en": (512, 8, 6, 6, 80, 51864),
    "base": (512, 8, 6, 6, 80, 51865),
    "small": (768, 12, 12, 12, 80, 51865),
    "medium": (1024, 16, 24, 24, 80, 51865),
    "large-v3": (1280, 20, 32, 32, 128, 51866),
    "large-v3-turbo": (1280, 20, 32, 4, 128, 51866),
}


def whisper_config(name: str, encoder_layers: int | None = None, decoder_layers: int | None = None) -> WhisperConfig:
    """The `WhisperConfig` of a released size; fewer layers when asked (same widths, for quick checks)."""
    if name not in GEOMETRIES:
        raise SlimWhisperError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRIES)}")
    d, heads, enc, dec, mels, vocab = GEOMETRIES[name]
    multilingual = vocab > 51864
    eot = 50257 if multilingual else 50256
    return WhisperConfig(vocab_size=vocab, num_mel_bins=mels, d_model=d, encoder_attention_heads=heads,
                         decoder_attention_heads=heads, encoder_layers=encoder_layers or enc,
                         decoder_layers=decoder_layers or dec, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
                         max_source_positions=1500, max_target_positions=448, decoder_start_token_id=eot + 1,
                         eos_token_id=eot, pad_token_id=eot, bos_token_id=eot)


def planned_mla(config: WhisperConfig, mla) -> WhisperConfig:
    """The config an MLA conversion with recipe `mla` (an `MLAConfig`) writes for this geometry."""
    from .mla.convert import target_names
    from .mla.math import kept_dim_indices
    from .models import SlimWhisperConfig

    heads, head_dim = config.decoder_attention_heads, config.d_model // config.decoder_attention_heads
    layers: dict[str, Any] = {}
    for name, kind in target_names(config, mla.modules):
        h = config.encoder_attention_heads if kind == "encoder_self" else heads
        kept = kept_dim_indices("uniform", h, head_dim, mla.kept_dims, None)
        layers[name] = {"latent_dim": mla.latent_width(config.d_model, h), "kept_dims": kept.tolist()}
    return SlimWhisperConfig.from_whisper(config, {"mla": {"recipe": mla.to_dict(), "layers": layers}})


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one model serving a batch: weights once, then per sequence its caches and activations."""

    weight_bytes: int
    cache_bytes_per_sequence: int
    activation_bytes_per_sequence: int

    def largest_batch(self, budget_bytes: int) -> int:
        per_sequence = self.cache_bytes_per_sequence + self.activation_bytes_per_sequence
        return max(0, (budget_bytes - self.weight_bytes) // per_sequence)


def parameter_count(config: WhisperConfig) -> int:
    """Parameters of the (compressed) model `config` describes, counted on the meta device."""
    import torch

    from .info import build_on_meta

    with torch.device("meta"):
        return sum(p.numel() for p in build_on_meta(config).parameters())


def memory_plan(config: WhisperConfig, tokens: int = 448, weight_bytes: int = 2, cache_bytes: int = 2,
                activation_bytes: int = 2) -> MemoryPlan:
    """What serving `config` costs: fp16 weights; per sequence its self cache at `tokens` positions, its cross
    cache (1500 frames) and the activations of encoding its 30-s window (the residual stream and q, k, v,
    attention output and normed copies, and the widest MLP activation: attention runs a fused kernel, so
    no [1500, 1500] score matrix) plus the float32 logits of a decode step."""
    from .memory import cached_numbers_per_token

    frames, d = config.max_source_positions, config.d_model
    cache = tokens * cached_numbers_per_token(config, "self_attn") + frames * cached_numbers_per_token(
        config, "encoder_attn")
    activations = frames * (6 * d + config.encoder_ffn_dim) * activation_bytes + 4 * config.vocab_size
    return MemoryPlan(parameter_count(config) * weight_bytes, cache * cache_bytes, activations)
