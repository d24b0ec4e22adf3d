"""engine/cache.py: static and fixed layers write in place, compact rows, grow for beams, refuse overflow."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from slimwhisper.engine.cache import FixedLayer, StaticEncoderDecoderCache, StaticLayer
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
    full = layer._keys_full.data_ptr()
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
