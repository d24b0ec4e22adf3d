"""bench calibrate: the measured rows and the full-model estimate follow from the geometry and the budget."""
from __future__ import annotations

import argparse

import pytest

from slimwhisper.bench.calibrate import extrapolate, measure_one, run
from slimwhisper.errors import SlimWhisperError
from slimwhisper.geometry import parameter_count, random_whisper, whisper_config
from slimwhisper.lowrank.calibrate import stats_bytes


def test_one_layer_measurement_counts_its_statistics_and_weights():
    row = measure_one("tiny.en", 1, seconds=1.0, budget_bytes=2**30)
    model = random_whisper("tiny.en", 1)[0]
    # per layer: q, k, v, out (384 wide) and fc1 (1536) and fc2 (384) outputs' streamed sums
    assert row["stats_bytes_per_layer"] == 5 * stats_bytes(384) + stats_bytes(1536)
    assert row["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert (row["layers"], row["groups"], row["largest_group_layers"], row["windows"]) == (1, 1, 1, 1)
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"]


def test_full_model_estimate_is_runtime_weights_largest_group_and_the_rest():
    per_layer = 100
    rows = [{"stats_bytes_per_layer": per_layer, "rss_before_bytes": 1000 + w, "weight_bytes": w,
             "peak_rss_bytes": 1000 + w + 7 + g * per_layer, "largest_group_layers": g} for w, g in ((50, 1), (90, 2))]
    full = extrapolate("large-v3", rows, budget_bytes=3 * per_layer + 50)
    weights = parameter_count(whisper_config("large-v3")) * 4
    assert full["largest_group_layers"] == 3 and full["all_layers_stats_bytes"] == 32 * per_layer
    assert full["peak_rss_bytes"] == 1000 + weights + 3 * per_layer + 7


def test_size_first_or_geometry_but_not_two_different_ones():
    args = argparse.Namespace(model="tiny.en", geometry="base", layers=[1], seconds=1.0, stats_budget_gib=1.0)
    with pytest.raises(SlimWhisperError, match="two sizes"):
        run(args)
    with pytest.raises(SlimWhisperError, match="released size"):
        run(argparse.Namespace(model="my-folder", geometry=None, layers=[1], seconds=1.0, stats_budget_gib=1.0))
