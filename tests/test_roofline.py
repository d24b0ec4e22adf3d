"""roofline.py: decode-step FLOPs by hand for MHA and MLA, the bound takes the slower of compute and memory."""
from __future__ import annotations

import slimwhisper as sw
from conftest import tiny_whisper
from slimwhisper.roofline import MachinePeaks, decode_step_flops


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
