"""loading/processor.py: tokenizer and generation config built from the model files."""
from __future__ import annotations

from pathlib import Path

import pytest

from loading.ct2_writer import NO_TS, VOCAB, write_tokenizer
from slimwhisper.errors import SlimWhisperError
from slimwhisper.loading.processor import build_generation_config, build_tokenizer


def test_timestamps_already_in_tokenizer_json(tmp_path: Path) -> None:
    """base's tokenizer.json ships the timestamp tokens; they must not be added twice."""
    write_tokenizer(tmp_path / "tokenizer.json", with_timestamps=True)
    tok = build_tokenizer(tmp_path / "tokenizer.json", VOCAB)
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|0.02|>") == NO_TS + 2
    with pytest.raises(SlimWhisperError, match="different Whisper models"):
        build_tokenizer(tmp_path / "tokenizer.json", VOCAB + 1)


def test_multilingual_generation_config(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tokenizer.json", with_timestamps=False)
    tok = build_tokenizer(tmp_path / "tokenizer.json", VOCAB)
    gc = build_generation_config(tok, {"lang_ids": [258, 259]}, is_multilingual=True, max_length=448,
                                 decoder_layers=4, decoder_heads=2)  # fmt: skip
    assert gc.lang_to_id == {"<|en|>": 258, "<|de|>": 259}
    assert gc.task_to_id == {"transcribe": 261, "translate": 260} and gc.is_multilingual
    assert gc.alignment_heads == [[2, 0], [2, 1], [3, 0], [3, 1]]  # default: upper half of the decoder
