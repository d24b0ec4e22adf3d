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
