"""benchmarks/linear_pairs.py: it times the encoder's own factor pair at each rank against the dense linear."""
from __future__ import annotations

import torch

from conftest import benchmark_script
from slimwhisper.lowrank import LowRankLinear

pairs = benchmark_script("linear_pairs")


def test_one_dense_linear_and_one_factor_pair_per_rank_of_the_asked_shape():
    mods = pairs.modules(24, 40, [4, 8])
    assert list(mods) == ["dense", "rank 4", "rank 8"]
    assert isinstance(mods["dense"], torch.nn.Linear) and (mods["dense"].in_features, mods["dense"].out_features) == (
        24, 40)
    for k in (4, 8):
        pair = mods[f"rank {k}"]
        assert isinstance(pair, LowRankLinear) and pair.rank == k
        assert pair.down.weight.shape == (k, 24) and pair.up.weight.shape == (40, k)


def test_every_module_is_timed_on_the_same_input():
    mods = pairs.modules(16, 16, [4])
    ms = pairs.median_ms(mods, torch.randn(32, 16), repeats=3)
    assert set(ms) == set(mods) and all(t > 0 for t in ms.values())
