"""What a (compressed) model is: recipe, geometry, cache bytes and parameter counts, from its config."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from .memory import cached_numbers_per_token, int8_cache_bytes, kv_cache_bytes
from .models import SlimWhisperConfig, SlimWhisperForConditionalGeneration


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def original_config(config: WhisperConfig) -> WhisperConfig:
    """The uncompressed Whisper config that `config` was made from."""
    data = config.to_dict()
    for key in ("model_type", "architectures", "compression", "transformers_version"):
        data.pop(key, None)
    return WhisperConfig(**data)


def _encoder_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.get_encoder().parameters())


def build_on_meta(config: WhisperConfig) -> torch.nn.Module:
    """The model `config` describes, without weights (call under `torch.device("meta")`)."""
    if isinstance(config, SlimWhisperConfig):
        return SlimWhisperForConditionalGeneration(config)
    return WhisperForConditionalGeneration(config)


def describe(config: WhisperConfig) -> dict[str, Any]:
    """A JSON-able summary; cache bytes are fp16, batch 1 (self: per token, cross: per 30-s utterance), and
    "converted_int8_cache" what the engine's int8 cache holds instead (int8 numbers, float32 scales)."""
    original = original_config(config)
    with torch.device("meta"):
        compressed_model = build_on_meta(config)
        original_model = WhisperForConditionalGeneration(original)
        original_params = _parameters(original_model)
        encoder_params = {
            "original": _encoder_parameters(original_model),
            "compressed": _encoder_parameters(compressed_model),
        }
    before, after, int8 = kv_cache_bytes(original), kv_cache_bytes(config), int8_cache_bytes(config)
    compression = dict(getattr(config, "compression", None) or {})
    mla = compression.get("mla", {})
    lowrank = compression.get("lowrank", {})
    return {
        "model_type": type(config).model_type,
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "decoder_layers": config.decoder_layers,
        "heads": config.decoder_attention_heads,
        "kv_bytes_per_token": {"original": before.self_attention, "converted": after.self_attention,
                               "converted_int8_cache": int8.self_attention},
        "cross_kv_bytes": {"original": before.cross_attention, "converted": after.cross_attention,
                           "converted_int8_cache": int8.cross_attention},
        "kv_reduction": {
            "self": 1 - cached_numbers_per_token(config, "self_attn") / cached_numbers_per_token(original, "self_attn"),
            "cross": 1
            - cached_numbers_per_token(config, "encoder_attn") / cached_numbers_per_token(original, "encoder_attn"),
        },
        "parameters": {"original": original_params, "converted": _parameters(compressed_model)},
        "mla": {
            "recipe": mla.get("recipe"),
            "geometry": {
                name: {
                    "latent_dim": g["latent_dim"],
                    "kept_dims_per_head": len(g["kept_dims"][0]),
                    "kept_dims": g["kept_dims"],
                }
                for name, g in mla.get("layers", {}).items()
            },
        }
        if mla
        else None,
        "encoder_params": encoder_params,
        "lowrank": {"recipe": lowrank.get("recipe"), "ranks": dict(lowrank.get("layers", {})),
                    "linear_flops_kept": lowrank.get("linear_flops_kept"),
                    "head_dims": dict(lowrank.get("head_dims", {})),
                    "attention_flops_kept": lowrank.get("attention_flops_kept", 1.0),
                    "calibration": lowrank.get("calibration")} if lowrank else None,
        "compression_format_version": compression.get("format_version"),
        "source": getattr(config, "slimwhisper_source", None),
    }


def rank_summary(ranks: dict[str, int], layers: int, targets: Sequence[str]) -> str:
    """One line for the low-rank encoder: each target linear's rank over the layers ("96", "64-128", "dense";
    with "dense in k of n layers" where some stayed dense), neighbours with the same text joined."""
    parts: list[tuple[list[str], str]] = []
    for target in targets:
        names = (f"model.encoder.layers.{i}.{target}" for i in range(layers))
        kept = [ranks[name] for name in names if name in ranks]
        text = "dense" if not kept else str(min(kept)) if min(kept) == max(kept) else f"{min(kept)}-{max(kept)}"
        if kept and len(kept) < layers:
            text += f", dense in {layers - len(kept)} of {layers} layers"
        short = target.rsplit(".", 1)[-1]
        if parts and parts[-1][1] == text:
            parts[-1][0].append(short)
        else:
            parts.append(([short], text))
    return " · ".join(f"{', '.join(names)} {text}" for names, text in parts)
