"""Texts of recordings: the one decoding path every part of slimwhisper uses.

`text_decoder(model, processor, engine=...)` returns a function from 16-kHz arrays (any length) to texts:

- engine="fast" (the default): the engine (`Transcriber`) with its defaults, exactly what
  `slimwhisper transcribe` runs, so evaluation scores what users get;
- engine="generate": transformers' `generate()`, the reference implementation: short-form for clips up
  to 30 s, its sequential long-form algorithm (timestamps) for longer ones.

Evaluation, the demo, the label-free training targets and benchmarks all decode through here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .audio import CHUNK_SAMPLES, SAMPLE_RATE
from .errors import SlimWhisperError
from .tokens import TokenIds

ENGINES = ("fast", "generate")
TextDecoder = Callable[[Sequence[np.ndarray], "str | None"], list[str]]


def is_multilingual(model) -> bool:
    """Whether the model takes language and task tokens (its generation config lists languages)."""
    return TokenIds.from_generation_config(model.generation_config).multilingual


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


def generate_arrays(model, processor, audios: Sequence[np.ndarray], language: str | None = None, *,
                    batch_size: int = 8, num_beams: int = 1, max_new_tokens: int | None = None) -> list[str]:
    """Texts from transformers' `generate`, in input order: short-form batches, then long-form ones."""
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


def check_engine_options(engine: str, quantize: str | None, kv_cache: str) -> None:
    """Refuse the engine's int8 options (int8 linears, int8 cache) with transformers' `generate`."""
    if engine == "generate" and (quantize or kv_cache != "float"):
        raise SlimWhisperError("--quantize and --kv-cache are the fast engine's options; drop them or use "
                               "--engine fast")


def text_decoder(model, processor, *, engine: str = "fast", batch_size: int = 8, num_beams: int = 1,
                 max_new_tokens: int | None = None, quantize: str | None = None, kv_cache: str = "float"
                 ) -> TextDecoder:
    """A function `(audios, language) -> texts` decoding with `engine` ("fast" or "generate"); `language`
    None lets multilingual models detect it. The engine is built once, so call the function per batch.
    `quantize` (int8 linears) and `kv_cache` (int8 cache) are the engine's options."""
    check_engine_options(engine, quantize, kv_cache)
    if engine == "generate":
        def decode(audios: Sequence[np.ndarray], language: str | None = None) -> list[str]:
            return generate_arrays(model, processor, audios, language, batch_size=batch_size, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens)

        return decode
    if engine != "fast":
        raise SlimWhisperError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    from .engine import Transcriber

    transcriber = Transcriber(model, processor, batch_size=batch_size, beam_size=num_beams,
                              max_new_tokens=max_new_tokens, quantize=quantize, kv_cache=kv_cache)

    def decode_fast(audios: Sequence[np.ndarray], language: str | None = None) -> list[str]:
        return [r.text for r in transcriber.transcribe(list(audios), language=language)] if len(audios) else []

    return decode_fast


def transcribe_arrays(model, processor, audios: Sequence[np.ndarray], *, language: str | None = None,
                      engine: str = "fast", batch_size: int = 8, num_beams: int = 1,
                      max_new_tokens: int | None = None) -> list[str]:
    """Texts for 16 kHz mono float32 arrays, in input order (one call of `text_decoder`)."""
    decode = text_decoder(model, processor, engine=engine, batch_size=batch_size, num_beams=num_beams,
                          max_new_tokens=max_new_tokens)
    return decode(audios, language)
