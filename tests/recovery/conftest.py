"""Fixtures of the recovery tests."""
from __future__ import annotations

import pytest

import slimwhisper as sw
from conftest import tiny_pair


@pytest.fixture
def english():
    return tiny_pair(False)


@pytest.fixture
def slim(english):
    """The tiny model converted to MLA at 75% (weights-only factorisation: no calibration audio)."""
    model, processor = english
    return sw.convert(model, sw.MLAConfig(kv_reduction=0.75, factorization="joint")), model, processor
