"""loading/openai.py: the openai-whisper export, names, dims and logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loading.ct2_writer import NO_TS, SOT, VOCAB, ct2_whisper, logits
from slimwhisper.errors import SlimWhisperError
from slimwhisper.loading import to_openai_whisper_checkpoint
from slimwhisper.loading.openai import openai_dims, openai_state_dict


def test_openai_export_names_and_dims(tmp_path: Path) -> None:
    model = ct2_whisper(ffn=(256, 256))
    sd = openai_state_dict(model)
    assert "decoder.token_embedding.weight" in sd and "encoder.ln_post.bias" in sd
    assert "decoder.blocks.1.cross_attn.key.weight" in sd and "decoder.blocks.1.cross_attn.key.bias" not in sd
    assert "encoder.blocks.0.mlp.2.weight" in sd and "encoder.positional_embedding" in sd
    assert len(sd) == len(model.state_dict()) - 1  # proj_out is tied, not exported
    path = to_openai_whisper_checkpoint(model, tmp_path / "sub" / "tiny.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["dims"] == openai_dims(model) and saved["dims"]["n_vocab"] == VOCAB
    with pytest.raises(SlimWhisperError, match="4 \\* d_model"):
        to_openai_whisper_checkpoint(ct2_whisper(), tmp_path / "bad.pt")


def test_openai_whisper_gives_the_same_logits(tmp_path: Path) -> None:
    whisper = pytest.importorskip("whisper")
    model = ct2_whisper(ffn=(256, 256))
    reference = whisper.load_model(str(to_openai_whisper_checkpoint(model, tmp_path / "tiny.pt")), device="cpu")
    torch.manual_seed(3)
    features = torch.randn(1, 80, 3000) * 0.5
    tokens = torch.tensor([[SOT, NO_TS, 40, 41, 42]])
    with torch.no_grad():
        theirs = reference(features, tokens)
    torch.testing.assert_close(theirs, logits(model), atol=1e-4, rtol=0)
