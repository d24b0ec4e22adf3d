"""Shared fixtures: tiny random Whisper models (fast, CPU) and paths to the shared real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Special ids of the tiny vocabulary (an English-only layout, like tiny.en's).
EOT, SOT, PREV, NO_TS = 90, 91, 92, 93


def tiny_whisper(seed: int = 0, d_model: int = 64, heads: int = 4, layers: int = 2) -> WhisperForConditionalGeneration:
    """A random Whisper small enough for unit tests, with a generation config generate() accepts."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights make attention peaky, so errors are visible
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
        no_timestamps_token_id=NO_TS,
        prev_sot_token_id=PREV,
        is_multilingual=False,
        max_length=64,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return model


@pytest.fixture
def tiny_model() -> WhisperForConditionalGeneration:
    return tiny_whisper()


@pytest.fixture
def features() -> torch.Tensor:
    """Two random log-mel inputs [2, 80, 3000]."""
    torch.manual_seed(1)
    return torch.randn(2, 80, 3000) * 0.5


def byte_whisper_pair(
    config_kwargs: dict,
    langs: tuple[str, ...],
    multilingual: bool,
    *,
    seed: int = 0,
    timestamps: bool = False,
    **generation_kwargs,
):
    """A random Whisper of `config_kwargs` size with a byte-level tokenizer in Whisper's special-token layout.

    Returns (model, processor, ids): ids maps each control token to its id; the generation config
    carries the language and task maps when `multilingual`.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = WhisperTokenizer(vocab={ch: i for i, ch in enumerate(bytes_to_unicode().values())}, merges=[])
    control = ["<|endoftext|>", "<|startoftranscript|>", *([f"<|{x}|>" for x in langs] if multilingual else []),
               "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"]
    tok.add_tokens(control, special_tokens=True)
    if timestamps:
        tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in control}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, decoder_start_token_id=sot, **config_kwargs)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    gc = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                          no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
                          is_multilingual=multilingual, suppress_tokens=[], begin_suppress_tokens=[eot],
                          **generation_kwargs)
    if multilingual:
        gc.lang_to_id = {f"<|{x}|>": ids[f"<|{x}|>"] for x in langs}
        gc.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config = gc
    return model, WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok), ids
