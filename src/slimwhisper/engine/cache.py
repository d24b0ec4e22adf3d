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

`for_model(..., kv_cache="int8")` builds `Int8StaticLayer`s and `Int8FixedLayer`s instead: every cached
vector in int8 with one scale per position and head, dequantised into one `Scratch` shared by all layers
as each layer attends (docs/mla.md, int8 cache).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention

KV_CACHE_KINDS = ("float", "int8")
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
        self.max_len = max_len
        # positions past `length` are never read, so the buffers need no zeroing
        self._full = self._allocate(batch, slots, max_len, dtype, torch.device(device))
        self._use(self._full)
        self.length = 0
        self.is_initialized = True
        self.dtype, self.device = dtype, torch.device(device)

    @staticmethod
    def _allocate(batch: int, slots: SlotShape, max_len: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Every per-position buffer of the layer, [B, heads, T_max, dim] each: keys and values here."""
        return [torch.empty(batch, h, max_len, d, dtype=dtype, device=device) for h, d in slots]

    def _use(self, tensors: list[torch.Tensor]) -> None:
        """Make `tensors` (the buffers, or their first rows) the live ones; keys and values are the first two."""
        self._live = list(tensors)
        self.keys, self.values = self._live[0], self._live[1]

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, max_len: int) -> StaticLayer:
        """A layer of `max_len` positions that already holds `keys`/`values` [B, H, T, d] (e.g. a prefill's)."""
        slots = ((keys.shape[1], keys.shape[3]), (values.shape[1], values.shape[3]))
        layer = cls(keys.shape[0], slots, max_len, keys.dtype, keys.device)
        layer.update(keys, values)
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated eagerly in `__init__`; nothing to do."""

    def _advance(self, count: int) -> tuple[int, int]:
        """(start, end) of `count` new positions, refused past the capacity."""
        start, end = self.length, self.length + count
        if end > self.max_len:
            raise SlimWhisperError(
                f"static cache holds {self.max_len} positions (its capacity), asked to write up to {end}"
            )
        self.length = end
        return start, end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions in place; return views [B, H, length, d] of everything cached."""
        start, end = self._advance(key_states.shape[-2])
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    @property
    def capacity_rows(self) -> int:
        return self._full[0].shape[0]

    def nbytes(self) -> int:
        """Bytes of the live rows' buffers (all positions)."""
        return sum(t.numel() * t.element_size() for t in self._live)

    def reset(self, rows: int | None = None) -> None:
        """Forget the cached positions and use the first `rows` rows of the buffers (default all)."""
        rows = self.capacity_rows if rows is None else rows
        if rows > self.capacity_rows:
            raise ValueError(f"this layer has {self.capacity_rows} rows, asked for {rows}")
        self.length = 0
        self._use([t[:rows] for t in self._full])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a negative count, as `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows in place (beam search): row i takes the old row beam_idx[i]."""
        n = self.length
        if n:
            for buf in self._live:
                view = buf[:, :, :n]
                view.copy_(view.index_select(0, beam_idx.to(buf.device)))

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows`, in that order (finished rows leave, beams repeat); copies the filled positions
        into the head of the buffers, which grow only when there are more rows than before."""
        n, filled = len(rows), self.length
        order = rows.tolist()
        if increasing(order):  # rows leave: compact in place
            compact_rows_(tuple(t[:, :, :filled] for t in self._live), order)
            self._use([t[:n] for t in self._full])
            return
        kept = [t[:, :, :filled].index_select(0, rows) for t in self._live]
        if n > self.capacity_rows:
            self._full = [t.new_empty((n, *t.shape[1:])) for t in self._full]
        self._use([t[:n] for t in self._full])
        for buf, part in zip(self._live, kept):
            buf[:, :, :filled].copy_(part)


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per vector along `dim` (absmax / 127): values int8, scales (keepdim) in
    x's dtype. A zero vector gets scale 0 and dequantises to zeros; an empty one (an MLA module that keeps
    no key dims caches [B, H, T, 0]) gets no scales."""
    if x.shape[dim] == 0:  # nothing to scale: no scales either
        return x.to(torch.int8), x.new_zeros(x.shape)
    scale = x.abs().amax(dim=dim, keepdim=True) / 127
    values = (x / scale.clamp_min(torch.finfo(x.dtype).tiny)).round_().clamp_(-127, 127).to(torch.int8)
    return values, scale


class Scratch:
    """Float buffers an int8 cache dequantises into, shared by all its layers.

    Layers attend one at a time, so one layer's worth of float keys and values serves them all: an int8
    cache holds its int8 positions, their scales, and this one scratch.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of `shape` backed by this slot's buffer (grown when too small); its contents are stale."""
        need = math.prod(shape)
        flat = self._flat.get(slot)
        if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != device:
            flat = self._flat[slot] = torch.empty(need, dtype=dtype, device=device)
        return flat[:need].view(shape)

    def dequantize(self, slot: str, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """values * scales (int8 and their broadcast scales) written into this slot's buffer."""
        return torch.mul(values, scales, out=self.take(slot, tuple(values.shape), dtype, values.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())


class Int8StaticLayer(StaticLayer):
    """A `StaticLayer` that stores int8 positions with one scale per position and head (per token for an
    MLA latent); `update` returns the cached prefix dequantised into the cache's shared `Scratch`."""

    def __init__(self, batch: int, slots: SlotShape, max_len: int, dtype: torch.dtype, device: torch.device,
                 scratch: Scratch):
        self.scratch = scratch
        super().__init__(batch, slots, max_len, dtype, device)

    @staticmethod
    def _allocate(batch: int, slots: SlotShape, max_len: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """int8 keys and values, then their scales [B, heads, T_max, 1] (none for an empty slot)."""
        values = [torch.empty(batch, h, max_len, d, dtype=torch.int8, device=device) for h, d in slots]
        return values + [torch.empty(batch, h, max_len, min(d, 1), dtype=dtype, device=device) for h, d in slots]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantise and write the new positions; return the whole cached prefix dequantised (scratch views)."""
        start, end = self._advance(key_states.shape[-2])
        out = []
        for i, (slot, new) in enumerate((("self_keys", key_states), ("self_values", value_states))):
            values, scales = quantize_int8(new)
            self._live[i][:, :, start:end].copy_(values)
            self._live[i + 2][:, :, start:end].copy_(scales)
            out.append(self.scratch.dequantize(slot, self._live[i][:, :, :end], self._live[i + 2][:, :, :end],
                                               self.dtype))
        return out[0], out[1]


class FixedLayer(CacheLayerMixin):
    """One cross-attention layer's cache: the encoder-side keys/values (or latent), set once per window.

    The engine's own cross-attention stores keys transposed ([B, H, h, T], `keys_transposed`) and reads
    them back with `read()`.
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

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values (or latent and kept key dims) as float tensors."""
        return self.keys, self.values

    def _stored(self) -> list[torch.Tensor]:
        """Every tensor that holds this window's rows (batch first)."""
        return [self.keys, self.values]

    def _keep(self, tensors: list[torch.Tensor]) -> None:
        self.keys, self.values = tensors[0], tensors[1]

    def nbytes(self) -> int:
        """Bytes of what this layer holds for the window (0 before the first step)."""
        return 0 if self.keys is None else sum(t.numel() * t.element_size() for t in self._stored())

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
        order, stored = rows.tolist(), self._stored()
        if increasing(order):  # rows leave: compact in place (the tensors may be the kept buffers)
            compact_rows_(tuple(stored), order)
            self._keep([t[: len(order)] for t in stored])
        else:
            self._keep([t.index_select(0, rows) for t in stored])


class Int8FixedLayer(FixedLayer):
    """A `FixedLayer` that stores int8 keys and values (or latent and kept dims) with one scale per frame and
    head; `read()` dequantises into the cache's shared `Scratch`, as do the buffers a window is built in."""

    def __init__(self, scratch: Scratch):
        super().__init__()
        self.scratch = scratch
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def buffers(self, key_shape: tuple, value_shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """Scratch to build the window's float keys and values in (they are quantised by `update`)."""
        device = torch.device(device)
        return (self.scratch.take("cross_keys", key_shape, dtype, device),
                self.scratch.take("cross_values", value_shape, dtype, device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantise the window's keys (per frame: over dim -2 when stored transposed) and values."""
        (keys, key_scales), (values, value_scales) = (
            quantize_int8(key_states, dim=-2 if self.keys_transposed else -1), quantize_int8(value_states)
        )
        self.keys, self.values, self.scales = keys, values, (key_scales, value_scales)
        self.dtype = key_states.dtype
        self.is_initialized = True
        return self.read()

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.scratch.dequantize("cross_keys", self.keys, self.scales[0], self.dtype),
                self.scratch.dequantize("cross_values", self.values, self.scales[1], self.dtype))

    def _stored(self) -> list[torch.Tensor]:
        return [self.keys, self.values, *self.scales]

    def _keep(self, tensors: list[torch.Tensor]) -> None:
        self.keys, self.values, self.scales = tensors[0], tensors[1], (tensors[2], tensors[3])

    def reset(self) -> None:
        super().reset()
        self.scales = None


class StaticEncoderDecoderCache(EncoderDecoderCache):
    """An `EncoderDecoderCache` of preallocated self-attention layers and once-per-window cross layers.

    Example:
        cache = StaticEncoderDecoderCache.for_model(model, batch=8, max_len=448)
        # pass as `past_key_values` to the decoder layers; cache.reset() before the next window
    """

    def __init__(self, self_layers: list[StaticLayer], cross_layers: list[FixedLayer], scratch: Scratch | None = None):
        super().__init__(Cache(layers=self_layers), Cache(layers=cross_layers))
        self.scratch = scratch

    @classmethod
    def for_model(
        cls, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None,
        kv_cache: str = "float",
    ) -> StaticEncoderDecoderCache:
        """Buffers for `batch` rows and `max_len` decoder positions, shaped from the model's decoder modules.

        `kv_cache="int8"` stores every layer's positions (and the cross-attention window) in int8 with a
        scale per position and head, dequantised into one shared scratch as each layer attends.
        """
        if kv_cache not in KV_CACHE_KINDS:
            raise SlimWhisperError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        param = next(model.parameters())
        dtype = dtype or (param.dtype if param.dtype.is_floating_point else torch.float32)
        device = device or param.device
        slots = self_attention_slots(model)
        if kv_cache == "float":
            return cls([StaticLayer(batch, s, max_len, dtype, device) for s in slots], [FixedLayer() for _ in slots])
        scratch = Scratch()
        return cls([Int8StaticLayer(batch, s, max_len, dtype, device, scratch) for s in slots],
                   [Int8FixedLayer(scratch) for _ in slots], scratch)

    @property
    def batch_size(self) -> int:
        return self.self_attention_cache.layers[0].keys.shape[0]

    @property
    def capacity_rows(self) -> int:
        return self.self_attention_cache.layers[0].capacity_rows

    @property
    def kv_cache(self) -> str:
        return "float" if self.scratch is None else "int8"

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
        """Bytes held by the self-attention buffers (all positions, all rows; int8 values and their scales)."""
        return sum(layer.nbytes() for layer in self.self_attention_cache.layers)
