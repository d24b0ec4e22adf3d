"""bench/encoder.py: encoder pass timing and parameter ratios."""
from __future__ import annotations

import statistics

import pytest

from slimwhisper.bench.encoder import bench_encoder


def test_encoder_bench(tiny_model):
    result = bench_encoder({"baseline": tiny_model, "model": tiny_model}, repeats=2)
    ms = result["ms_per_pass"]
    for key, ms_per_pass in ms.items():  # the median of the repeats, which are kept rounded
        assert ms_per_pass == pytest.approx(statistics.median(result["times_ms"][key]), abs=1e-3), key
    assert result["speedup"] == {"model": ms["baseline"] / ms["model"]}
    encoder_params = sum(p.numel() for p in tiny_model.model.encoder.parameters())
    assert result["params"] == {"baseline": encoder_params, "model": encoder_params}
    assert result["params_ratio"]["model"] == 1.0
