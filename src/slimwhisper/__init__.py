"""slimwhisper: make Whisper cheaper to run (MLA decoder, low-rank encoder) and prove what it costs.

    import slimwhisper as sw
    model, processor = sw.load("tiny.en")
    slim = sw.convert(model, sw.MLAConfig(kv_reduction=0.75))   # calibrates on bundled audio
    slim.save_pretrained("tiny-mla75"); processor.save_pretrained("tiny-mla75")
    lite = sw.convert(slim, sw.LowRankConfig(preset="b"))      # and a low-rank encoder on top
"""
from __future__ import annotations

from typing import Any

from . import models  # noqa: F401  (registers the HF config/model classes with the Auto classes)
from .engine import Transcriber
from .errors import AudioError, ConfigVersionError, ModelNotFoundError, SlimWhisperError
from .lowrank import LowRankConfig, LowRankLinear, WhisperLowRankAttention
from .memory import KVCacheBytes, kv_cache_bytes
from .mla import MLAConfig, WhisperMLAAttention, set_decode_mode
from .models import SlimWhisperConfig, SlimWhisperForConditionalGeneration

__version__ = "0.1.0"


def convert(
    model, config: MLAConfig | LowRankConfig, calibration: Any = None, **kwargs
) -> SlimWhisperForConditionalGeneration:
    """Compress `model` as `config` says and return the compressed copy (the input is left unchanged).

    `calibration` is audio for the data-aware parts of a recipe (a path, a list of paths or 16 kHz
    arrays); None uses the bundled clips. See each method's config for what it needs.
    """
    if isinstance(config, MLAConfig):
        from .mla import convert_mla

        return convert_mla(model, config, calibration, **kwargs)
    if isinstance(config, LowRankConfig):
        from .lowrank import convert_lowrank

        return convert_lowrank(model, config, calibration, **kwargs)
    raise SlimWhisperError(f"unknown compression config {type(config).__name__}")


def load(name_or_path: str, **kwargs):
    """Load a Whisper model and its processor from a short name, a directory or a hub id; see `loading.load`."""
    from .loading import load as _load

    return _load(name_or_path, **kwargs)


__all__ = [
    "AudioError",
    "ConfigVersionError",
    "KVCacheBytes",
    "LowRankConfig",
    "LowRankLinear",
    "MLAConfig",
    "ModelNotFoundError",
    "SlimWhisperConfig",
    "SlimWhisperError",
    "SlimWhisperForConditionalGeneration",
    "Transcriber",
    "WhisperLowRankAttention",
    "WhisperMLAAttention",
    "convert",
    "kv_cache_bytes",
    "load",
    "set_decode_mode",
]
