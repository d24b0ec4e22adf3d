"""Preallocated decoder caches: writes in place, returns length-sliced views, never concatenates.

`StaticLayer` (self attention) holds buffers [B, Hk, T_max, dk] and [B, Hv, T_max, dv] sized from the
module: an ordinary `WhisperAttention` caches keys and values [B, H, T, h]; a `WhisperMLAAttention`
caches its latent [B, 1, T, d_c] in the key slot and its kept key dims [B, H, T, r] in the value slot.
`FixedLayer` (cross attention) keeps what the first decoder step computed from the encoder output
(keys/values or latent), once per window. Both are transformers `CacheLayerMixin`s inside an
`EncoderDecoderCache`, so the model's own attention modules (MHA and MLA) drive them unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention

SlotShape = tuple[tuple[int, int], tuple[int, int]]  # ((key heads, key dim), (value heads, value dim))


def self_attention_slots(model: nn.Module) -> list[SlotShape]:
    """Per decoder layer, the (heads, dim) of the key and value slots its self attention caches."""
    slots = []
    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        if isinstance(attn, WhisperMLAAttention):
            slots.append(((1, attn.latent_dim), (attn.num_heads, attn.kept_dims)))
        else:
            slots.append(((attn.num_heads, attn.head_dim), (attn.num_heads, attn.head_dim)))
    return slots


class StaticLayer(CacheLayerMixin):
    """One self-attention layer's cache: eager buffers, in-place writes, views of the filled prefix."""

    is_compileable = False
    is_sliding = False

    def __init__(self, batch: int, slots: SlotShape, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        (kh, kd), (vh, vd) = slots
        self.max_len = max_len
        self.keys = torch.zeros(batch, kh, max_len, kd, dtype=dtype, device=device)
        self.values = torch.zeros(batch, vh, max_len, vd, dtype=dtype, device=device)
        self.length = 0
        self.is_initialized = True
        self.dtype, self.device = dtype, torch.device(device)

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, max_len: int) -> StaticLayer:
        """A layer of `max_len` positions that already holds `keys`/`values` [B, H, T, d] (e.g. a prefill's)."""
        slots = ((keys.shape[1], keys.shape[3]), (values.shape[1], values.shape[3]))
        layer = cls(keys.shape[0], slots, max_len, keys.dtype, keys.device)
        layer.update(keys, values)
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated eagerly in `__init__`; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions in place; return views [B, H, length, d] of everything cached."""
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise SlimWhisperError(
                f"static cache holds {self.max_len} positions (its capacity), asked to write up to {end}"
            )
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        """Forget the cached positions (the buffers are overwritten by the next writes)."""
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a negative count, as `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows in place (beam search): row i takes the old row beam_idx[i]."""
        n = self.length
        if n:
            for buf in (self.keys, self.values):
                view = buf[:, :, :n]
                view.copy_(view.index_select(0, beam_idx.to(buf.device)))

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (finished rows leave the batch); reallocates, so call it rarely."""
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)


class FixedLayer(CacheLayerMixin):
    """One cross-attention layer's cache: the encoder-side keys/values (or latent), set once per window.

    The engine's own cross-attention stores keys transposed ([B, H, h, T], `keys_transposed`).
    """

    is_compileable = False
    is_sliding = False
    keys_transposed = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        self.is_initialized = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def get_seq_length(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.shape[-1] if self.keys_transposed else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.keys_transposed = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """No-op: beams of one audio share its encoder output, and beams are reordered within their audio."""

    def select_rows(self, rows: torch.LongTensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class StaticEncoderDecoderCache(EncoderDecoderCache):
    """An `EncoderDecoderCache` of preallocated self-attention layers and once-per-window cross layers.

    Example:
        cache = StaticEncoderDecoderCache.for_model(model, batch=8, max_len=448)
        # pass as `past_key_values` to the decoder layers; cache.reset() before the next window
    """

    def __init__(self, self_layers: list[StaticLayer], cross_layers: list[FixedLayer]):
        super().__init__(Cache(layers=self_layers), Cache(layers=cross_layers))

    @classmethod
    def for_model(
        cls, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> StaticEncoderDecoderCache:
        """Buffers for `batch` rows and `max_len` decoder positions, shaped from the model's decoder modules."""
        param = next(model.parameters())
        dtype = dtype or (param.dtype if param.dtype.is_floating_point else torch.float32)
        device = device or param.device
        slots = self_attention_slots(model)
        return cls(
            [StaticLayer(batch, s, max_len, dtype, device) for s in slots],
            [FixedLayer() for _ in slots],
        )

    @property
    def batch_size(self) -> int:
        return self.self_attention_cache.layers[0].keys.shape[0]

    def reset(self) -> None:
        for layer in self.self_attention_cache.layers + self.cross_attention_cache.layers:
            layer.reset()
        for idx in self.is_updated:
            self.is_updated[idx] = False

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only the batch rows `rows`, in that order, in every layer."""
        for layer in self.self_attention_cache.layers + self.cross_attention_cache.layers:
            layer.select_rows(rows)

    def nbytes(self) -> int:
        """Bytes held by the self-attention buffers (all positions, all rows)."""
        layers = self.self_attention_cache.layers
        return sum(t.numel() * t.element_size() for lay in layers for t in (lay.keys, lay.values))
