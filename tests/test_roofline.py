"""roofline.py: decode-step and encoder-pass FLOPs by hand (MHA, MLA, low-rank linears, rank-space attention),
least encoder bytes, the bound takes the slower of compute and memory."""
from __future__ import annotations

import pytest

import slimwhisper as sw
from conftest import tiny_whisper
from slimwhisper.engine.quantize import quantize_dynamic_int8
from slimwhisper.lowrank.math import attention_flops
from slimwhisper.lowrank.modules import LowRankLinear, WhisperLowRankAttention
from slimwhisper.roofline import (
    EncoderBytes,
    MachinePeaks,
    decode_step_flops,
    encoder_bytes,
    encoder_flops,
    encoder_roofline,
    measure_peaks,
)


def test_decode_step_flops_count_linears_and_attention_by_hand():
    model = tiny_whisper().eval()
    c = model.config
    d, layers, frames = c.d_model, c.decoder_layers, c.max_source_positions
    # per layer and row: q,k,v,o of self; q,o of cross (its k,v run once per window); fc1, fc2
    linears = layers * (4 * d * d + 2 * d * d + 2 * d * c.decoder_ffn_dim) + d * c.vocab_size
    flops = decode_step_flops(model, batch=3, cache_len=9)
    assert flops.linears == 2 * 3 * linears
    assert flops.self_attention == 3 * layers * 4 * d * 10
    assert flops.cross_attention == 3 * layers * 4 * d * frames


def test_mla_attention_flops_follow_the_latent_width():
    model = tiny_whisper().eval()
    slim = sw.convert(model, sw.MLAConfig(modules=("decoder_cross",), kv_reduction=0.75))
    attn = slim.model.decoder.layers[0].encoder_attn
    heads, h, d_c = attn.num_heads, attn.head_dim, attn.latent_dim
    frames, layers = model.config.max_source_positions, model.config.decoder_layers
    per_layer = 4 * heads * d_c * frames + 2 * heads * h * d_c + 2 * heads * h * d_c  # no kept dims
    flops = decode_step_flops(slim, batch=1, cache_len=9)
    assert flops.cross_attention == layers * per_layer
    assert flops.linears == decode_step_flops(model, batch=1, cache_len=9).linears  # kv_down runs once per window


def test_roofline_bound_is_the_slower_of_compute_and_memory():
    peaks = MachinePeaks(gflops=100.0, gbps=10.0)
    assert peaks.bound_seconds(1e9, 1e6) == 1e9 / 100e9  # compute bound
    assert peaks.bound_seconds(1e6, 1e9) == 1e9 / 10e9  # memory bound


def _lowrank_layer(model, ranks: dict[str, int], path: str = "auto"):
    """Layer 0 of `model`'s encoder with its self-attention made a `WhisperLowRankAttention` of `ranks`."""
    layer = model.model.encoder.layers[0]
    layer.self_attn = WhisperLowRankAttention.like(layer.self_attn, ranks)
    layer.self_attn.attention_path = path
    return layer


def test_encoder_flops_and_bytes_of_a_dense_encoder_by_hand():
    model = tiny_whisper().eval()
    c = model.config
    d, mel, ffn, layers, length = c.d_model, c.num_mel_bins, c.encoder_ffn_dim, c.encoder_layers, 1500
    flops = encoder_flops(model, batch=3)
    assert flops.conv == 3 * (2 * d * mel * 3 * 3000 + 2 * d * d * 3 * 1500)  # kernel 3, stride 1 then 2
    assert flops.linear_dense == 3 * layers * 2 * length * (4 * d * d + 2 * d * ffn)
    assert flops.linear_lowrank == 0
    assert flops.attention == 3 * layers * 4 * length * length * d  # scores and values, 2 L^2 d each
    assert flops.total == flops.conv + flops.linear_dense + flops.attention
    weights = sum(p.numel() for p in model.model.encoder.parameters()) * 4
    activations = mel * 3000 + 2 * d * 3000 + d * 1500 + (layers + 1) * 2 * length * d
    assert encoder_bytes(model, batch=3) == EncoderBytes(weights, 3 * activations * 4)


def test_lowrank_linear_counts_its_rank_and_the_standard_attention_path_its_up_projections():
    model = tiny_whisper().eval()
    dense = encoder_flops(model, batch=2)
    d, ffn, length = model.config.d_model, model.config.encoder_ffn_dim, 1500
    layer = model.model.encoder.layers[1]
    layer.fc1 = LowRankLinear(d, ffn, rank=8)
    _lowrank_layer(model, {"q_proj": 8, "k_proj": 8, "v_proj": 8}, path="standard")
    flops = encoder_flops(model, batch=2)
    assert flops.linear_lowrank == 2 * (2 * length * 8 * (d + ffn) + 3 * 2 * length * 8 * (d + d))
    assert flops.linear_dense == dense.linear_dense - 2 * 2 * length * (d * ffn + 3 * d * d)
    assert flops.attention == dense.attention and flops.conv == dense.conv


def test_rank_space_attention_counts_what_attention_flops_says():
    model = tiny_whisper().eval()
    dense = encoder_flops(model)
    d, heads, length = model.config.d_model, model.config.encoder_attention_heads, 1500
    attn = _lowrank_layer(model, {"q_proj": 8, "k_proj": 8, "v_proj": 8}).self_attn
    assert attn.reduced_plan(length) == (True, True)  # rank 8 < head dim 16: the rank-space path
    terms = attention_flops(length, heads, d // heads, 8, 8, 8)
    flops = encoder_flops(model)
    per_layer_dense = 4 * length * length * d
    assert flops.attention == dense.attention - per_layer_dense + terms["scores_reduced"] + terms["values_reduced"]
    # the path reads q, k and v's up-projections as tensors (counted in those terms): only the downs run as linears
    assert flops.linear_lowrank == 3 * 2 * length * 8 * d
    attn.attention_path = "standard"  # the two-linear path: its up-projections and full attention
    standard = encoder_flops(model)
    assert standard.attention + standard.linear_lowrank == (
        dense.attention - per_layer_dense + terms["scores_full"] + terms["values_full"] + flops.linear_lowrank)


def test_encoder_roofline_takes_the_slower_bound_and_int8_linears_at_their_rate():
    model = tiny_whisper().eval()
    flops, nbytes = encoder_flops(model, batch=2), encoder_bytes(model, batch=2)
    fast_memory = MachinePeaks(gflops=100.0, gbps=1e6, int8_gflops=400.0)
    entry = encoder_roofline(model, 2, measured_ms=50.0, peaks=fast_memory)
    assert entry["bound_by"] == "compute" and not entry["int8_linears"]
    assert entry["bound_ms"] == pytest.approx(flops.total / 100e9 * 1e3)  # float linears: the float32 rate
    assert entry["attained"] == pytest.approx(entry["bound_ms"] / 50.0)
    assert entry["gflops_achieved"] == pytest.approx(flops.total / 50e-3 / 1e9)
    assert entry["gflop_parts"]["linear_dense"] == flops.linear_dense / 1e9
    slow_memory = MachinePeaks(gflops=1e9, gbps=1.0)
    entry = encoder_roofline(model, 2, measured_ms=50.0, peaks=slow_memory)
    assert entry["bound_by"] == "memory" and entry["bound_ms"] == pytest.approx(nbytes.total / 1e9 * 1e3)
    q = quantize_dynamic_int8(model)
    assert encoder_flops(q, batch=2) == flops  # int8 linears do the same work
    q_bytes = encoder_bytes(q, batch=2)
    c = model.config
    linear_weights = c.encoder_layers * (4 * c.d_model**2 + 2 * c.d_model * c.encoder_ffn_dim)
    assert q_bytes == EncoderBytes(nbytes.weights - 3 * linear_weights, nbytes.activations)  # 1 byte, not 4, a weight
    entry = encoder_roofline(q, 2, measured_ms=50.0, peaks=fast_memory)
    assert entry["int8_linears"]
    assert entry["bound_ms"] == pytest.approx(((flops.total - flops.linears) / 100e9 + flops.linears / 400e9) * 1e3)


def test_measure_peaks_measures_the_int8_rate_only_when_asked():
    assert measure_peaks(size=128, copy_mib=4, repeats=1).int8_gflops is None
    peaks = measure_peaks(size=128, copy_mib=4, repeats=1, int8=True)
    assert peaks.gflops > 0 and peaks.gbps > 0 and peaks.int8_gflops > 0
