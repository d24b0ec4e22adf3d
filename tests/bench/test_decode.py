"""bench/decode.py: decode timing entries, static-cache and engine decode steps, cache bytes and traffic."""
from __future__ import annotations

import statistics

import pytest
import torch

import slimwhisper as sw
from slimwhisper.bench.decode import bench_decode, prepare_decode, prepare_engine_decode
from slimwhisper.engine.cache import StaticLayer
from slimwhisper.errors import SlimWhisperError


def test_decode_bench_returns_positive_times_and_matching_bytes(tiny_model, slim):
    result = bench_decode(slim, tiny_model, batch=2, cache_len=6, repeats=2, warmup=1, caches=("dynamic", "static"),
                          encoder_frames=20)
    entries = {"baseline", "model", "model_materialized", "baseline_static", "model_static",
               "model_materialized_static"}
    assert set(result["ms_per_token"]) == entries
    for key, ms_per_token in result["ms_per_token"].items():  # the median of the repeats, which are kept rounded
        assert ms_per_token == pytest.approx(statistics.median(result["times_ms"][key]), abs=1e-3), key
        assert result["tokens_per_s"][key] == pytest.approx(2 * 1e3 / ms_per_token), key  # batch 2
    assert set(result["speedup"]) == entries - {"baseline"}
    assert set(result["speedup_same_cache"]) == entries - {"baseline", "baseline_static"}
    ms = result["ms_per_token"]
    assert result["speedup_same_cache"]["model_static"] == ms["baseline_static"] / ms["model_static"]
    assert result["speedup"]["model"] == ms["baseline"] / ms["model"]
    assert all(len(t) == 2 and min(t) > 0 for t in result["times_ms"].values())
    assert result["batch"] == 2 and result["cache_len"] == 6 and result["encoder_frames"] == 20
    for name, b in result["cache_bytes"].items():
        assert b["held_self"] == b["analytic_self"] and b["held_cross"] == b["analytic_cross"], name
    # fp32 K and V of every layer for batch 2: 6 cached tokens (self), 20 encoder frames (cross); MLA keeps 25%
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    per_position = layers * 2 * d * 4 * 2
    assert result["cache_bytes"]["baseline"] == {"held_self": 6 * per_position, "analytic_self": 6 * per_position,
                                                 "held_cross": 20 * per_position, "analytic_cross": 20 * per_position}
    assert result["cache_bytes"]["model"]["held_self"] == 6 * per_position // 4
    assert result["cache_bytes"]["model"]["held_cross"] == 20 * per_position // 4
    assert all(m.decode_mode == "absorbed" for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention))
    traffic = result["traffic"]
    assert set(traffic["bytes_per_step"]) == {"baseline", "model", "baseline_static", "model_static"}
    dynamic, static = traffic["bytes_per_step"]["model"], traffic["bytes_per_step"]["model_static"]
    assert dynamic["self_cache"] == 3 * static["self_cache"] == 3 * result["cache_bytes"]["model"]["analytic_self"]
    assert traffic["bound_speedup"]["model_static"] == (
        traffic["bytes_per_step"]["baseline_static"]["total"] / static["total"]
    ) > 1
    roof = result["roofline"]
    assert roof["machine"]["gflops"] > 0 and roof["machine"]["gbps"] > 0
    for key, entry in roof["entries"].items():  # the bound is the slower of FLOPs and bytes, and is met at most
        kind = "_static" if key.endswith("_static") else ""
        nbytes = traffic["bytes_per_step"][("model" if key.startswith("model") else "baseline") + kind]["total"]
        assert entry["bound_ms"] == pytest.approx(1e3 * max(entry["gflop"] / roof["machine"]["gflops"],
                                                            nbytes / 1e9 / roof["machine"]["gbps"]))
        assert entry["attained"] == pytest.approx(entry["bound_ms"] / ms[key]), key


def test_decode_bench_with_the_int8_cache_holds_what_the_formula_says(tiny_model, slim):
    result = bench_decode(slim, tiny_model, batch=2, cache_len=6, repeats=1, warmup=1, caches=("engine",),
                          encoder_frames=20, kv_cache="int8", materialized=False)
    for name, b in result["cache_bytes"].items():  # the engine's self cache has room for the timed step
        assert b["held_cross"] == b["analytic_cross"], name
        assert b["held_self"] == b["analytic_self"] * 7 // 6, name
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    heads = tiny_model.config.decoder_attention_heads
    assert result["cache_bytes"]["baseline"]["held_cross"] == 2 * 20 * layers * (2 * d + 2 * heads * 4)


@pytest.mark.parametrize("self_only", [True, False])
def test_engine_decode_step_equals_the_hf_step_and_is_timed_as_its_own_kind(tiny_model, self_only):
    """The "engine" kind times the Transcriber's decode step: same logits as the HF step on the same prefill
    (MHA and MLA, self-only or self + cross), step after step, and the cache is cropped back each time."""
    modules = ("decoder_self",) if self_only else ("decoder_self", "decoder_cross")
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, kept_dims=2, factorization="joint",
                                               modules=modules))
    for m in (tiny_model, slim):
        hf, engine = prepare_decode(m, 2, 6, 20), prepare_engine_decode(m, 2, 6, 20)
        with torch.inference_mode():
            for _ in range(2):
                torch.testing.assert_close(engine.step(), hf.step()[:, -1], atol=1e-4, rtol=1e-4)
        assert engine.cache.get_seq_length() == hf.cache.get_seq_length() == 6
    result = bench_decode(slim, tiny_model, batch=2, cache_len=6, repeats=2, warmup=1, caches=("dynamic", "engine"),
                          encoder_frames=20, materialized=False)
    assert set(result["ms_per_token"]) == {"baseline", "model", "baseline_engine", "model_engine"}
    assert set(result["speedup_same_cache"]) == {"model", "model_engine"}
    assert result["traffic"]["bytes_per_step"]["model_engine"]["self_cache"] == (
        result["cache_bytes"]["model"]["analytic_self"]  # written in place: read once
    )


def test_decode_bench_adds_an_unfolded_entry_only_when_folding(tiny_model, slim):
    small = sw.convert(tiny_model, sw.MLAConfig(latent_dim=8, factorization="joint"))  # folds both (docs/mla.md)
    kwargs = dict(batch=1, cache_len=4, repeats=1, warmup=0, encoder_frames=10, materialized=False)
    assert set(bench_decode(small, **kwargs)["ms_per_token"]) == {"model", "model_unfolded"}
    assert set(bench_decode(small, fold="never", **kwargs)["ms_per_token"]) == {"model"}
    assert set(bench_decode(slim, **kwargs)["ms_per_token"]) == {"model"}  # d_c = 32 of 64: no fold pays
    assert set(bench_decode(slim, fold="always", **kwargs)["ms_per_token"]) == {"model", "model_unfolded"}
    assert all(m.fold == "auto" for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention))


@pytest.mark.parametrize("which", ["mha", "mla"])
def test_static_cache_decode_equals_dynamic(tiny_model, slim, which):
    """Steps on preallocated buffers (non-contiguous views) give the same logits, and the length stays fixed."""
    model = slim if which == "mla" else tiny_model
    dynamic = prepare_decode(model, batch=3, cache_len=5, encoder_frames=30)
    static = prepare_decode(model, batch=3, cache_len=5, encoder_frames=30, cache="static", shared=dynamic)
    layer = static.cache.self_attention_cache.layers[0]
    assert isinstance(layer, StaticLayer) and layer.keys.shape[-2] == 6  # capacity: cache_len + the new token
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(static.step(), dynamic.step(), atol=1e-5, rtol=1e-5)
            assert static.cache.get_seq_length() == dynamic.cache.get_seq_length() == 5


def test_prepare_decode_rejects_too_long_caches(tiny_model):
    with pytest.raises(SlimWhisperError, match="positions"):
        prepare_decode(tiny_model, batch=1, cache_len=tiny_model.config.max_target_positions)
