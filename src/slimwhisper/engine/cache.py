"""Preallocated decoder caches: writes in place, returns length-sliced views, never concatenates.

`StaticLayer` (self attention) holds buffers [B, Hk, T_max, dk] and [B, Hv, T_max, dv] sized from the
module: an ordinary `WhisperAttention` caches keys and values [B, H, T, h]; a `WhisperMLAAttention`
caches its latent [B, 1, T, d_c] in the key slot and its kept key dims [B, H, T, r] in the value slot.
`FixedLayer` (cross attention) keeps what the first decoder step computed from the encoder output
(keys/values or latent), once per window. Both are transformers `CacheLayerMixin`s inside an
`EncoderDecoderCache`, so the model's own attention modules (MHA and MLA) drive them unchanged.

Buffers outlive a window: `reset(rows)` readies a cache for the next batch of windows without
allocating, and dropping finished rows compacts them into the head of the same buffers. Fresh
multi-megabyte tensors cost page faults on every window (a few % of decode time on a CPU).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention

SlotShape = tuple[tuple[int, int], tuple[int, int]]  # ((key heads, key dim), (value heads, value dim))


def compact_rows_(buffers: tuple[torch.Tensor, ...], rows: list[int]) -> None:
    """Move row rows[i] to row i of every buffer, in place, for strictly increasing `rows`.

    Row i is written only after every source row below it has been read, since rows[j] >= j for
    increasing rows: no temporary copy of the kept rows is needed.
    """
    for i, r in enumerate(rows):
        if r != i:
            for buf in buffers:
                buf[i].copy_(buf[r])


def increasing(rows: list[int]) -> bool:
    """Whether `rows` only drops rows (strictly increasing), so `compact_rows_` can work in place."""
    return all(a < b for a, b in zip(rows, rows[1:]))


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
        # positions past `length` are never read, so the buffers need no zeroing
        self._keys_full = torch.empty(batch, kh, max_len, kd, dtype=dtype, device=device)
        self._values_full = torch.empty(batch, vh, max_len, vd, dtype=dtype, device=device)
        self.keys, self.values = self._keys_full, self._values_full
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

    @property
    def capacity_rows(self) -> int:
        return self._keys_full.shape[0]

    def reset(self, rows: int | None = None) -> None:
        """Forget the cached positions and use the first `rows` rows of the buffers (default all)."""
        rows = self.capacity_rows if rows is None else rows
        if rows > self.capacity_rows:
            raise ValueError(f"this layer has {self.capacity_rows} rows, asked for {rows}")
        self.length = 0
        self.keys, self.values = self._keys_full[:rows], self._values_full[:rows]

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
        """Keep only `rows`, in that order (finished rows leave, beams repeat); copies the filled positions
        into the head of the buffers, which grow only when there are more rows than before."""
        n, filled = len(rows), self.length
        order = rows.tolist()
        if increasing(order):  # rows leave: compact in place
            compact_rows_((self.keys[:, :, :filled], self.values[:, :, :filled]), order)
            self.keys, self.values = self._keys_full[:n], self._values_full[:n]
            return
        kept = [t[:, :, :filled].index_select(0, rows) for t in (self.keys, self.values)]
        if n > self.capacity_rows:
            self._keys_full = self._keys_full.new_empty((n, *self._keys_full.shape[1:]))
            self._values_full = self._values_full.new_empty((n, *self._values_full.shape[1:]))
        self.keys, self.values = self._keys_full[:n], self._values_full[:n]
        self.keys[:, :, :filled].copy_(kept[0])
        self.values[:, :, :filled].copy_(kept[1])


class FixedLayer(CacheLayerMixin):
    """One cross-attention layer's cache: the encoder-side keys/values (or latent), set once per window.

    The engine's own cross-attention stores keys transposed ([B, H, h, T], `keys_transposed`).
    """

    is_compileable = False
    is_sliding = False
    keys_transposed = False
    _spare: tuple[torch.Tensor, torch.Tensor] | None = None  # buffers kept for the next window

    def buffers(self, key_shape: tuple, value_shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """Tensors to write this window's keys and values into: the previous window's buffers when they fit."""
        spare = self._spare
        fits = (spare is not None and spare[0].dtype == dtype and spare[0].device == torch.device(device)
                and spare[0].shape[1:] == key_shape[1:] and spare[1].shape[1:] == value_shape[1:]
                and spare[0].shape[0] >= key_shape[0])
        if not fits:
            spare = self._spare = (torch.empty(key_shape, dtype=dtype, device=device),
                                   torch.empty(value_shape, dtype=dtype, device=device))
        return spare[0][: key_shape[0]], spare[1][: value_shape[0]]

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
        if self.keys is None:
            return
        order = rows.tolist()
        if increasing(order):  # rows leave: compact in place (the tensors may be the kept buffers)
            compact_rows_((self.keys, self.values), order)
            self.keys, self.values = self.keys[: len(order)], self.values[: len(order)]
        else:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)


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

    @property
    def capacity_rows(self) -> int:
        return self.self_attention_cache.layers[0].capacity_rows

    @property
    def max_len(self) -> int:
        return self.self_attention_cache.layers[0].max_len

    def reset(self, rows: int | None = None) -> None:
        """Ready the cache for a new batch of `rows` windows (default all rows) without allocating."""
        for layer in self.self_attention_cache.layers:
            layer.reset(rows)
        for layer in self.cross_attention_cache.layers:
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
