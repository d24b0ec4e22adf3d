"""Whisper's published geometries, and what a batch of them needs in memory, without any weights.

`whisper_config("large-v3")` is the exact architecture of a released size (layers can be cut for fast
tests); `planned_mla(config, mla)` is the config an MLA conversion of it would write (shapes only: the
geometry needs no calibration); `memory_plan` counts weights, caches and activations of a batch, so
`slimwhisper bench kv --geometry large-v3 --budget-gib 24` can say what fits before anyone has the weights;
`random_model("large-v3", folder, layers=2)` saves a random-weight model of that geometry (release tokenizer
ids, mel bins) that every command accepts, for tests and benchmarks of the big sizes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


# Large-v3 added one language (Cantonese) after the 99 of the earlier multilingual models: every control
# token from <|translate|> on moves up by one, so its vocabulary has 51866 entries.
_EXTRA_LANGUAGE = "<|yue|>"
_FIRST_SHIFTED = 50358  # <|translate|> in the 51865-token vocabulary


def _shifted_tokenizer_json(source: Path, target: Path) -> None:
    """Base's tokenizer.json with <|yue|> inserted before <|translate|>: the large-v3 id layout."""
    data = json.loads(source.read_text(encoding="utf-8"))
    added = data["added_tokens"]
    template = next(t for t in added if t["id"] == _FIRST_SHIFTED)
    for token in added:
        if token["id"] >= _FIRST_SHIFTED:
            token["id"] += 1
    added.append({**template, "id": _FIRST_SHIFTED, "content": _EXTRA_LANGUAGE})
    added.sort(key=lambda t: t["id"])
    target.write_text(json.dumps(data), encoding="utf-8")


def geometry_processor(vocab_size: int, num_mel_bins: int) -> tuple[Any, dict[str, Any]]:
    """(WhisperProcessor, CTranslate2-style side config) for a vocabulary size, from the installed tokenizers.

    No released tokenizer ships offline for small and up, but their vocabularies are base's (51865) or
    base's plus one language (51866), so the exact id layout is rebuilt from what is installed.
    """
    import tempfile

    from transformers import WhisperProcessor

    from .loading.convert import _read_ct2_config
    from .loading.processor import build_feature_extractor, build_tokenizer, english_normalizer_file
    from .loading.registry import resolve_short_name

    if vocab_size not in (51864, 51865, 51866):
        raise SlimWhisperError(f"no Whisper tokenizer has {vocab_size} tokens; use one of {', '.join(GEOMETRIES)}")
    directory = resolve_short_name("tiny.en" if vocab_size == 51864 else "base").directory
    side = _read_ct2_config(directory)
    shift = vocab_size == 51866
    ct2_config = {"suppress_ids": [i + (shift and i >= _FIRST_SHIFTED) for i in side.get("suppress_ids", [])],
                  "suppress_ids_begin": list(side.get("suppress_ids_begin", []))}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_json = directory / "tokenizer.json"
        if shift:
            _shifted_tokenizer_json(tokenizer_json, Path(tmp) / "tokenizer.json")
            tokenizer_json = Path(tmp) / "tokenizer.json"
        tokenizer = build_tokenizer(tokenizer_json, vocab_size, english_normalizer_file())
    return WhisperProcessor(feature_extractor=build_feature_extractor(num_mel_bins), tokenizer=tokenizer), ct2_config


def random_whisper(name: str, layers: int = 2, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """(model, processor) of a released size with random weights and `layers` encoder and decoder layers.

    Widths, heads, mel bins, vocabulary and control-token ids are the release's, so every command can be
    exercised on the big geometries before anyone has their weights. `overrides` change config fields
    (e.g. d_model=64 for a model cheap enough for fault-injection tests that run it many times).
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    from .loading.processor import MULTILINGUAL_MIN_VOCAB, build_generation_config, config_token_kwargs
    from .tokens import TokenIds

    if layers < 1:
        raise SlimWhisperError(f"layers must be at least 1, got {layers}")
    config = whisper_config(name, encoder_layers=layers, decoder_layers=layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    processor, side = geometry_processor(config.vocab_size, config.num_mel_bins)
    for key, value in config_token_kwargs(TokenIds.from_tokenizer(processor.tokenizer), side).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = build_generation_config(
        processor.tokenizer, side, is_multilingual=config.vocab_size >= MULTILINGUAL_MIN_VOCAB,
        max_length=config.max_target_positions, decoder_layers=layers, decoder_heads=config.decoder_attention_heads)
    return model, processor


def random_model(name: str, out: str | Path, layers: int = 2, seed: int = 0, **overrides: Any) -> Path:
    """`random_whisper` saved as a model folder that `load` and every command accept (weights, processor)."""
    from .loading.processor import save_processor

    model, processor = random_whisper(name, layers, seed, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
