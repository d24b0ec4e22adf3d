"""slimwhisper: make Whisper cheaper to run (MLA decoder, low-rank encoder) and prove what it costs.

    import slimwhisper as sw
    model, processor = sw.load("tiny.en")
    slim = sw.convert(model, sw.MLAConfig(kv_reduction=0.75))   # calibrates on bundled audio
    slim.save_pretrained("tiny-mla75"); processor.save_pretrained("tiny-mla75")
    lite = sw.convert(slim, sw.LowRankConfig(preset="b"))      # and a low-rank encoder on top
    print(sw.transcribe(lite, processor, "talk.flac").text)    # the engine, recordings of any length
    print(sw.describe(lite.config)["kv_bytes_per_token"])

The verbs are `load`, `convert`, `transcribe` (or `Transcriber`), `evaluate`, `finetune` and `describe`;
module classes stay importable from their packages (`slimwhisper.mla`, `slimwhisper.lowrank`, ...).
"""
from __future__ import annotations

from typing import Any

from . import models  # noqa: F401  (registers the HF config/model classes with the Auto classes)
from .engine import Segment, Transcriber, Transcription
from .errors import AudioError, ConfigVersionError, ModelNotFoundError, SlimWhisperError
from .eval import EvalResult, evaluate
from .info import describe
from .lowrank import LowRankConfig, LowRankLinear, WhisperLowRankAttention  # noqa: F401  (classes: not in __all__)
from .memory import KVCacheBytes, kv_cache_bytes
from .mla import MLAConfig, WhisperMLAAttention, set_decode_mode  # noqa: F401
from .models import SlimWhisperConfig, SlimWhisperForConditionalGeneration
from .recovery import FinetuneConfig, TrainResult, finetune

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


def transcribe(model, processor, audio, **options) -> Transcription | list[Transcription]:
    """Transcribe a path, a 16 kHz array or a list of them with the engine.

    `options` go to `Transcriber` (batch_size, beam_size, quantize, device, vad, ...) or to its
    `transcribe` (language, mode, timestamps, temperature, ...), whichever takes them; build a
    `Transcriber` yourself to transcribe many batches with one engine.
    """
    import inspect

    engine_keys = set(inspect.signature(Transcriber).parameters) - {"model", "processor"}
    engine = Transcriber(model, processor, **{k: v for k, v in options.items() if k in engine_keys})
    return engine.transcribe(audio, **{k: v for k, v in options.items() if k not in engine_keys})


def load(name_or_path: str, **kwargs):
    """Load a Whisper model and its processor from a short name, a directory or a hub id; see `loading.load`."""
    from .loading import load as _load

    return _load(name_or_path, **kwargs)


__all__ = [
    "AudioError",
    "ConfigVersionError",
    "EvalResult",
    "FinetuneConfig",
    "KVCacheBytes",
    "LowRankConfig",
    "MLAConfig",
    "ModelNotFoundError",
    "Segment",
    "SlimWhisperConfig",
    "SlimWhisperError",
    "SlimWhisperForConditionalGeneration",
    "TrainResult",
    "Transcriber",
    "Transcription",
    "convert",
    "describe",
    "evaluate",
    "finetune",
    "kv_cache_bytes",
    "load",
    "transcribe",
]
