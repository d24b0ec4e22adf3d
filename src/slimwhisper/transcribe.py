"""Transcribe audio of any length with a (compressed) Whisper through `generate()`.

Clips up to 30 s are batched through short-form generation. Longer recordings use Whisper's
sequential long-form decoding (30-s windows that advance by the predicted timestamps, so words are
not cut at window edges), batched as well.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .audio import CHUNK_SAMPLES, SAMPLE_RATE


def generation_kwargs(model, language: str | None, num_beams: int) -> dict:
    """Arguments for `generate` that fit the model: language/task only for multilingual models."""
    kwargs: dict = {"num_beams": num_beams, "do_sample": False}
    if getattr(model.generation_config, "is_multilingual", False):
        kwargs["task"] = "transcribe"
        if language:
            kwargs["language"] = language
    return kwargs


@torch.no_grad()
def transcribe_arrays(
    model,
    processor,
    audios: Sequence[np.ndarray],
    *,
    language: str | None = None,
    batch_size: int = 8,
    num_beams: int = 1,
) -> list[str]:
    """Texts for 16 kHz mono float32 arrays, in input order."""
    texts: list[str | None] = [None] * len(audios)
    short = [i for i, a in enumerate(audios) if len(a) <= CHUNK_SAMPLES]
    long = [i for i, a in enumerate(audios) if len(a) > CHUNK_SAMPLES]
    kwargs = generation_kwargs(model, language, num_beams)
    for start in range(0, len(short), batch_size):
        idx = short[start : start + batch_size]
        feats = processor.feature_extractor([audios[i] for i in idx], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        tokens = model.generate(_to_model(feats.input_features, model), **kwargs)
        for i, text in zip(idx, processor.batch_decode(tokens, skip_special_tokens=True)):
            texts[i] = text.strip()
    for start in range(0, len(long), batch_size):
        idx = long[start : start + batch_size]
        feats = processor.feature_extractor(
            [audios[i] for i in idx],
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            truncation=False,
            padding="longest",
            return_attention_mask=True,
        )
        tokens = model.generate(
            _to_model(feats.input_features, model),
            attention_mask=feats.attention_mask.to(model.device),
            return_timestamps=True,
            condition_on_prev_tokens=False,
            **kwargs,
        )
        for i, text in zip(idx, processor.batch_decode(tokens, skip_special_tokens=True)):
            texts[i] = text.strip()
    return [t or "" for t in texts]


def _to_model(features: torch.Tensor, model) -> torch.Tensor:
    return features.to(device=model.device, dtype=model.dtype)
