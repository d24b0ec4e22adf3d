"""memory.py: KV-cache bytes against held caches and the formula, decoder weight and step traffic."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from slimwhisper.memory import cache_bytes_held, decode_step_traffic, decoder_weight_bytes, kv_cache_bytes


def test_step_traffic_counts_decoder_weights_once_and_caches_by_kind(tiny_model):
    """Decoder layers + final norm + LM head (tied to the embedding: once); int8 linears one byte per weight."""
    decoder = tiny_model.model.decoder
    expected = sum(p.numel() * 4 for p in [*decoder.layers.parameters(), *decoder.layer_norm.parameters()])
    expected += tiny_model.proj_out.weight.numel() * 4
    assert tiny_model.proj_out.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # tied in this config
    assert decoder_weight_bytes(tiny_model) == expected
    int8 = sw.engine.quantize.quantize_dynamic_int8(tiny_model)
    linear_weights = sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))
    linear_weights += tiny_model.proj_out.weight.numel()
    assert decoder_weight_bytes(int8) == expected - 3 * linear_weights  # 4 bytes -> 1 per linear weight
    kv = kv_cache_bytes(tiny_model, 3, 7, torch.float32, 20)
    for concatenated, factor in ((True, 3), (False, 1)):
        t = decode_step_traffic(tiny_model, 3, 7, torch.float32, 20, concatenated=concatenated)
        assert (t.self_cache, t.cross_cache) == (factor * kv.self_attention, kv.cross_attention)
        assert t.total == t.weights + t.self_cache + t.cross_cache


@pytest.mark.parametrize("modules", [("decoder_self",), ("decoder_self", "decoder_cross")])
def test_cache_bytes_match_formula(tiny_model, features, modules):
    slim = sw.convert(tiny_model, sw.MLAConfig(modules=modules, kv_reduction=0.75, kept_dims=2, factorization="joint"))
    for model in (tiny_model, slim):
        out = model.generate(features, max_new_tokens=5, return_dict_in_generate=True)
        cache = out.past_key_values
        held = cache_bytes_held(cache)
        expected = sw.kv_cache_bytes(model, batch=2, tokens=cache.get_seq_length(), dtype=torch.float32)
        assert held == expected
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    per_token = sw.kv_cache_bytes(slim, tokens=1, dtype=torch.float16).self_attention
    assert per_token == layers * int(0.25 * 2 * d) * 2  # 75% fewer numbers than 2*d per layer, 2 bytes each
