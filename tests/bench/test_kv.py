"""bench/kv.py: held cache bytes equal the analytic count, and the batch that fits a budget."""
from __future__ import annotations

import pytest
import torch

from slimwhisper.bench.kv import bench_kv, max_batch
from slimwhisper.memory import kv_cache_bytes


def test_kv_bench_held_equals_analytic_and_budget(tiny_model, slim):
    result = bench_kv({"baseline": tiny_model, "model": slim}, [1, 4], [8, 16], torch.float16, budget_bytes=2**20)
    base, model = result["models"]["baseline"], result["models"]["model"]
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    for entry, kept in ((base, 1), (model, 4)):  # MLA keeps a quarter of the numbers
        check = entry["held_check"]  # a prefilled fp32 cache, batch 2, 16 tokens
        assert check["equal"] and check["held_self"] == check["analytic_self"] == layers * 2 * d * 4 * 2 * 16 // kept
        # fp16 K and V per layer, token and sequence, at every (batch, length) asked for
        assert [(r["batch"], r["length"], r["self"]) for r in entry["table"]] == [
            (b, n, layers * 2 * d * 2 * b * n // kept) for b in (1, 4) for n in (8, 16)]
    assert base["self_bytes_per_token"] == layers * 2 * d * 2
    assert model["self_ratio_vs_baseline"] == pytest.approx(0.25) and model["cross_ratio_vs_baseline"] == 0.25
    per_seq = kv_cache_bytes(slim, batch=1, tokens=16, dtype=torch.float16)
    assert max_batch(slim, 2**20, 16, torch.float16) == {"self": 2**20 // per_seq.self_attention,
                                                          "self_cross": 2**20 // per_seq.total}
    assert model["max_batch_in_budget"]["self"] > base["max_batch_in_budget"]["self"]
