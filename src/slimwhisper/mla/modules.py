"""`WhisperMLAAttention`: a `WhisperAttention` that caches a latent instead of keys and values.

Per head j the key is [k_kept^j | k_comp^j], where k_kept^j = W_kept^j x is exact and
k_comp^j = U_k^j c is rebuilt from the shared latent c = D x; the value is v^j = U_v^j c + b_v^j.
The query rows were permuted within each head at conversion to the same [kept | compressed] order,
so every per-head dot product equals the original one (at full latent width the module is exact).

Cache slots (ordinary `EncoderDecoderCache` layers, so beam reordering, cropping and
`get_seq_length` work unchanged):
    keys   = latent c          [B, 1, T, d_c]
    values = kept key dims     [B, H, T, r]    (r may be 0)
Prefill and training use the materialised path (K and V rebuilt, any attention backend);
single-token decode uses the absorbed path, which reads the cache without up-projecting it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import WhisperAttention, eager_attention_forward

from .math import absorbed_attention

DECODE_MODES = ("absorbed", "materialized")


class WhisperMLAAttention(WhisperAttention):
    """Multi-head latent attention with Whisper's interface; see the module docstring for the cache."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kept_dims: int,
        latent_dim: int,
        dropout: float = 0.0,
        is_decoder: bool = False,
        bias: bool = True,
        is_causal: bool = False,
        layer_idx: int | None = None,
        config=None,
    ):
        super().__init__(embed_dim, num_heads, dropout, is_decoder, bias, is_causal, layer_idx, config)
        del self.k_proj, self.v_proj  # replaced by the factorised projections below
        self.kept_dims = kept_dims
        self.latent_dim = latent_dim
        self.comp_dims = self.head_dim - kept_dims
        self.kept_proj = nn.Linear(embed_dim, num_heads * kept_dims, bias=False) if kept_dims else None
        self.kv_down = nn.Linear(embed_dim, latent_dim, bias=False)
        self.up_k = nn.Linear(latent_dim, num_heads * self.comp_dims, bias=False)
        self.up_v = nn.Linear(latent_dim, embed_dim, bias=bias)
        self.decode_mode = "absorbed"

    @classmethod
    def like(cls, attn: WhisperAttention, kept_dims: int, latent_dim: int) -> WhisperMLAAttention:
        """An (uninitialised) MLA module with the same role and size as `attn`."""
        return cls(
            attn.embed_dim,
            attn.num_heads,
            kept_dims=kept_dims,
            latent_dim=latent_dim,
            dropout=attn.dropout,
            is_decoder=attn.is_decoder,
            bias=attn.v_proj.bias is not None,
            is_causal=attn.is_causal,
            layer_idx=attn.layer_idx,
            config=attn.config,
        )

    def project_latent(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What this module caches for `states` [B, T, d]: latent [B, 1, T, d_c] and kept keys [B, H, T, r]."""
        batch, length = states.shape[:2]
        latent = self.kv_down(states).unsqueeze(1)
        if self.kept_proj is None:
            kept = states.new_zeros(batch, self.num_heads, length, 0)
        else:
            kept = self.kept_proj(states).view(batch, length, self.num_heads, self.kept_dims).transpose(1, 2)
        return latent, kept

    def expand_kv(self, latent: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise per-head keys and values [B, H, T, h] from the cached latent and kept dims."""
        batch, _, length, _ = latent.shape
        c = latent.squeeze(1)
        k_comp = self.up_k(c).view(batch, length, self.num_heads, self.comp_dims).transpose(1, 2)
        keys = torch.cat([kept, k_comp], dim=-1) if self.kept_dims else k_comp
        values = self.up_v(c).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        return keys, values

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_cross = key_value_states is not None
        input_shape = hidden_states.shape[:-1]
        query = (self.q_proj(hidden_states) * self.scaling).view(*input_shape, self.num_heads, self.head_dim)
        query = query.transpose(1, 2)  # [B, H, L, h]

        cache, is_updated = past_key_values, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            if is_cross:  # the encoder latent is computed once, then reused at every step
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        if is_cross and cache is not None and is_updated:
            latent, kept = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            latent, kept = self.project_latent(key_value_states if is_cross else hidden_states)
            if cache is not None:
                latent, kept = cache.update(latent, kept, self.layer_idx)

        if self._use_absorbed(query, cache):
            out, weights = absorbed_attention(
                query,
                latent,
                kept,
                self._up_k_heads(),
                self._up_v_heads(),
                self._bias_v_heads(),
                attention_mask,
                need_weights=output_attentions,
            )
        else:
            keys, values = self.expand_kv(latent, kept)
            attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            out, weights = attention(
                self,
                query.contiguous(),
                keys,
                values,
                attention_mask,
                dropout=0.0 if not self.training else self.dropout,
                scaling=1.0,  # q is pre-scaled, as in WhisperAttention
                output_attentions=output_attentions,
                **kwargs,
            )
        out = self.out_proj(out.reshape(*input_shape, -1).contiguous())
        return out, weights

    def _use_absorbed(self, query: torch.Tensor, cache) -> bool:
        """Absorb only when decoding one token from a cache (prefill and training materialise)."""
        return self.decode_mode == "absorbed" and cache is not None and query.shape[-2] == 1 and not self.training

    def _up_k_heads(self) -> torch.Tensor:
        return self.up_k.weight.view(self.num_heads, self.comp_dims, self.latent_dim)

    def _up_v_heads(self) -> torch.Tensor:
        return self.up_v.weight.view(self.num_heads, self.head_dim, self.latent_dim)

    def _bias_v_heads(self) -> torch.Tensor | None:
        return None if self.up_v.bias is None else self.up_v.bias.view(self.num_heads, self.head_dim)


def set_decode_mode(model: nn.Module, mode: str) -> None:
    """Choose how every MLA module decodes: "absorbed" (default) or "materialized" (for checks)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, WhisperMLAAttention):
            module.decode_mode = mode
