"""engine/cache.py: static and fixed layers write in place, compact rows, grow for beams, refuse overflow."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from slimwhisper.engine.cache import (
    FixedLayer,
    Int8StaticLayer,
    Scratch,
    StaticEncoderDecoderCache,
    StaticLayer,
    quantize_int8,
)
from slimwhisper.errors import SlimWhisperError


def test_static_cache_overflow_is_an_error_and_crop_drops_positions():
    layer = StaticLayer.holding(torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 3, 2), max_len=3)
    with pytest.raises(SlimWhisperError, match="capacity"):
        layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    layer.crop(-1)
    assert layer.get_seq_length() == 2
    keys, values = layer.update(torch.full((1, 1, 1, 2), 5.0), torch.full((1, 1, 1, 2), 7.0))
    assert keys.data_ptr() == layer.keys.data_ptr()  # a view of the buffer, not a copy
    assert keys[0, 0, :, 0].tolist() == [0.0, 0.0, 5.0] and values[0, 0, :, 0].tolist() == [1.0, 1.0, 7.0]
    layer.crop(-2)
    assert layer.get_seq_length() == 1


def test_static_cache_writes_in_place_and_returns_views(tiny_model):
    cache = StaticEncoderDecoderCache.for_model(tiny_model, batch=3, max_len=10)
    layer = cache.self_attention_cache.layers[0]
    buf = layer.keys.data_ptr()
    k1, v1 = torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    keys, values = cache.self_attention_cache.update(k1, v1, 0)
    assert keys.shape == (3, 4, 2, 16) and keys.data_ptr() == buf  # a view of the buffer, no copy
    k2 = torch.randn(3, 4, 1, 16)
    keys, _ = cache.self_attention_cache.update(k2, k2, 0)
    assert keys.shape[2] == 3 and torch.equal(keys[:, :, 2:], k2) and torch.equal(keys[:, :, :2], k1)
    assert cache.get_seq_length(0) == 3 and layer.keys.data_ptr() == buf
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.keys[0, :, :2], k1[2]) and torch.equal(layer.keys[1, :, 2:3], k2[0])
    cache.select_rows(torch.tensor([1]))
    assert layer.keys.shape[0] == 1 and torch.equal(layer.keys[0, :, :2], k1[0])
    cache.reset()
    assert cache.get_seq_length(0) == 0 and not any(cache.is_updated.values())
    with pytest.raises(ValueError, match="static cache holds 10"):
        cache.self_attention_cache.update(torch.randn(1, 4, 11, 16), torch.randn(1, 4, 11, 16), 0)


def test_static_cache_shapes_follow_mla_modules(tiny_model):
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    cache = StaticEncoderDecoderCache.for_model(slim, batch=2, max_len=7)
    attn = slim.model.decoder.layers[0].self_attn
    layer = cache.self_attention_cache.layers[0]
    assert layer.keys.shape == (2, 1, 7, attn.latent_dim) and layer.values.shape == (2, 4, 7, attn.kept_dims)
    assert attn.latent_dim < 2 * 64


def test_fixed_layer_compacts_its_kept_buffers_in_place():
    layer = FixedLayer()
    keys, values = layer.buffers((4, 2, 3, 5), (4, 2, 5, 3), torch.float32, "cpu")
    keys.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(keys))
    values.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(values))
    layer.update(keys, values)
    layer.select_rows(torch.tensor([0, 2, 3]))
    assert layer.keys.data_ptr() == keys.data_ptr() and layer.keys[:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    assert layer.values[:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    layer.reset()
    again = layer.buffers((3, 2, 3, 5), (3, 2, 5, 3), torch.float32, "cpu")
    assert again[0].data_ptr() == keys.data_ptr(), "the next window reuses the buffers"
    assert layer.buffers((5, 2, 3, 5), (5, 2, 5, 3), torch.float32, "cpu")[0].data_ptr() != keys.data_ptr()


def test_static_layer_compacts_in_place_grows_for_beams_and_resets_rows():
    layer = StaticLayer(4, ((2, 3), (2, 1)), max_len=6, dtype=torch.float32, device="cpu")
    keys = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).view(4, 2, 2, 3)
    layer.update(keys, keys[..., :1])
    full = layer._full[0].data_ptr()
    layer.select_rows(torch.tensor([1, 2, 3]))  # finished rows leave: compacted in place
    assert layer.keys.data_ptr() == full and layer.keys.shape[0] == 3
    assert torch.equal(layer.keys[:, :, :2], keys[[1, 2, 3]])
    assert torch.equal(layer.values[:, :, :2], keys[[1, 2, 3]][..., :1])
    layer.select_rows(torch.tensor([2, 0]))  # any order
    assert layer.keys.data_ptr() == full and torch.equal(layer.keys[:, :, :2], keys[[3, 1]])
    layer.select_rows(torch.tensor([0, 0, 1, 1, 1]))  # beams repeat rows: more than the buffers hold
    assert layer.capacity_rows == 5 and torch.equal(layer.keys[:, :, :2], keys[[3, 3, 1, 1, 1]])
    layer.reset(3)
    assert layer.keys.shape[0] == 3 and layer.get_seq_length() == 0
    with pytest.raises(ValueError, match="rows"):
        layer.reset(6)


def test_quantize_int8_rounds_within_half_a_step_and_keeps_zero_and_empty_vectors():
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = 0.0
    values, scales = quantize_int8(x)
    assert values.dtype == torch.int8 and scales.shape == (2, 3, 5, 1)
    assert (values.float() * scales - x).abs().le(scales / 2 + 1e-7).all()
    assert values.abs().amax(dim=-1).flatten()[1:].eq(127).all()  # every non-zero vector uses the full range
    assert torch.equal(values[0, 0, 0], torch.zeros(8, dtype=torch.int8))
    transposed, t_scales = quantize_int8(x, dim=-2)
    assert t_scales.shape == (2, 3, 1, 8)
    empty, e_scales = quantize_int8(x[..., :0])
    assert empty.shape == e_scales.shape == (2, 3, 5, 0)


def test_int8_static_layer_matches_a_float_layer_through_updates_beams_and_leaving_rows():
    """Same operations on a float and an int8 layer: what `update` returns agrees to the int8 rounding,
    rows and positions stay aligned with their scales, and the held bytes are numbers + scales."""
    gen = torch.Generator().manual_seed(1)
    scratch = Scratch()
    slots = ((1, 6), (2, 3))  # an MLA-like latent slot and a kept-dims slot
    ref = StaticLayer(4, slots, 8, torch.float32, "cpu")
    q8 = Int8StaticLayer(4, slots, 8, torch.float32, "cpu", scratch)
    assert q8.nbytes() == 4 * 8 * (6 + 2 * 3) + 4 * 8 * (1 + 2) * 4

    def both(*new):
        a, b = ref.update(*new), q8.update(*new)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=x.abs().max().item() / 127, rtol=0)
        return b

    both(torch.randn(4, 1, 3, 6, generator=gen), torch.randn(4, 2, 3, 3, generator=gen))
    for layer in (ref, q8):
        layer.reorder_cache(torch.tensor([2, 2, 0, 1]))
        layer.select_rows(torch.tensor([0, 3]))
    keys, _ = both(torch.randn(2, 1, 1, 6, generator=gen), torch.randn(2, 2, 1, 3, generator=gen))
    assert keys.shape == (2, 1, 4, 6) and keys.data_ptr() == scratch.take("self_keys", (1,), keys.dtype,
                                                                          keys.device).data_ptr()
