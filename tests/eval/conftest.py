"""Fixtures of the evaluation tests: tiny Whispers with a real (byte-level) tokenizer, built once per module."""
from __future__ import annotations

import pytest

from conftest import tiny_whisper_with_processor


@pytest.fixture(scope="module")
def multi():
    return tiny_whisper_with_processor(True)


@pytest.fixture(scope="module")
def english_only():
    return tiny_whisper_with_processor(False, seed=1)
