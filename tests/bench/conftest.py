"""Fixtures of the benchmark tests."""
from __future__ import annotations

import pytest

import slimwhisper as sw


@pytest.fixture
def slim(tiny_model):
    """`tiny_model` with MLA self- and cross-attention, 75% fewer cached numbers, 2 kept key dims."""
    cfg = sw.MLAConfig(kv_reduction=0.75, kept_dims=2, factorization="joint", modules=("decoder_self", "decoder_cross"))
    return sw.convert(tiny_model, cfg)
