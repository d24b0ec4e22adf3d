"""Transcribe audio of any length with a (compressed) Whisper through `generate()`.

Clips up to 30 s are batched through short-form generation. Longer recordings use Whisper's
sequential long-form decoding (30-s windows that advance by the predicted timestamps, so words are
not cut at window edges), batched as well. Evaluation, the CLI and the demo all decode through here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .audio import CHUNK_SAMPLES, SAMPLE_RATE


def is_multilingual(model) -> bool:
    """Whether the model takes language and task tokens (its generation config says, or lists languages)."""
    config = model.generation_config
    flag = getattr(config, "is_multilingual", None)
    return bool(flag) if flag is not None else len(getattr(config, "lang_to_id", None) or {}) > 1


def generation_kwargs(model, language: str | None, num_beams: int, max_new_tokens: int | None = None) -> dict:
    """Arguments for `generate` that fit the model: language/task only for multilingual models."""
    kwargs: dict = {"num_beams": num_beams, "do_sample": False}
    if is_multilingual(model):
        kwargs["task"] = "transcribe"
        if language:
            kwargs["language"] = language
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


@torch.inference_mode()
def generate_texts(model, processor, audios: Sequence[np.ndarray], *, long_form: bool, **kwargs) -> list[str]:
    """One `generate` call for a batch of 16 kHz arrays: short-form (<= 30 s each) or long-form."""
    extra = {"truncation": False, "padding": "longest", "return_attention_mask": True} if long_form else {}
    feats = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt", **extra)
    param = next(model.parameters())
    inputs = {"input_features": feats.input_features.to(device=param.device, dtype=param.dtype)}
    if long_form:
        inputs.update(attention_mask=feats.attention_mask.to(param.device), return_timestamps=True)
    ids = model.generate(**inputs, **kwargs)
    if not torch.is_tensor(ids):  # a ModelOutput when generation returns a dict
        ids = ids["sequences"]
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def transcribe_arrays(
    model,
    processor,
    audios: Sequence[np.ndarray],
    *,
    language: str | None = None,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Texts for 16 kHz mono float32 arrays, in input order."""
    texts = [""] * len(audios)
    kwargs = generation_kwargs(model, language, num_beams, max_new_tokens)
    for long_form in (False, True):
        idx = [i for i, a in enumerate(audios) if (len(a) > CHUNK_SAMPLES) == long_form]
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            out = generate_texts(model, processor, [audios[i] for i in batch], long_form=long_form, **kwargs)
            for i, text in zip(batch, out):
                texts[i] = text
    return texts
