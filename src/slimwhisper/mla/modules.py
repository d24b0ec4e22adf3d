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
single-token decode uses the absorbed path, which reads the cache without up-projecting it. In
inference the absorbed path may also fold U_k into q_proj and U_v into out_proj (docs/mla.md, folding), chosen
per module size by `fold_choice` ("auto") or forced with `set_decode_mode(..., fold=...)`; folded
weights are derived on first use and rebuilt whenever the weights they come from change.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import WhisperAttention, eager_attention_forward

from .math import absorb_query, expand_values, fold_choice, fold_output, fold_query, latent_attention

DECODE_MODES = ("absorbed", "materialized")
FOLD_MODES = ("auto", "never", "always")


WeightOf = Callable[[nn.Module], tuple[torch.Tensor, "torch.Tensor | None"]]  # a linear's float weight, bias


@dataclass(frozen=True)
class StepWeights:
    """The float weights of one decode step, for a caller that builds its own projections (the engine fuses
    and may quantise them): `parts` (query, latent, kept key dims) stack into one linear whose output splits
    by `widths`; `output`, when U_v is folded, is out_proj with U_v in it."""

    parts: list[tuple[torch.Tensor, torch.Tensor | None]]
    widths: tuple[int, int, int]
    query_folded: bool
    output: tuple[torch.Tensor, torch.Tensor | None] | None


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
        self.fold = "auto"
        self._folded: tuple[tuple, dict] | None = None  # (source weight versions, folded tensors)

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

        if self._use_absorbed(input_shape[-1], cache):
            out, weights = self.absorbed(hidden_states, latent, kept, attention_mask, output_attentions)
            return out, weights
        query = (self.q_proj(hidden_states) * self.scaling).view(*input_shape, self.num_heads, self.head_dim)
        keys, values = self.expand_kv(latent, kept)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            query.transpose(1, 2).contiguous(),
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

    def absorbed(
        self, hidden_states: torch.Tensor, latent: torch.Tensor, kept: torch.Tensor, mask, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention straight from the latent cache (one-token self-attention steps; the engine's cross-attention
        at any length), with the projections folded where chosen."""
        folded = self.folded_weights()
        if "q_weight" in folded:
            query = nn.functional.linear(hidden_states, folded["q_weight"], folded["q_bias"])
        else:
            query = self.q_proj(hidden_states) * self.scaling
        output = None
        if "o_weight" in folded:
            output = partial(nn.functional.linear, weight=folded["o_weight"], bias=folded["o_bias"])
        return self.attend_latent(query, latent, kept, mask, query_folded="q_weight" in folded, output=output,
                                  need_weights=need_weights)

    def attend_latent(
        self,
        query: torch.Tensor,
        latent: torch.Tensor,
        kept: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        query_folded: bool = False,
        output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        out_proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The absorbed path after the query projection: output [B, L, d] and (optionally) probabilities.

        `query` [B, L, .] is q_proj's output times the attention scale [H*h], or with `query_folded`
        (U_k folded into q_proj) [H*r kept | H*d_c absorbed]. `output`, when given, maps the mixed
        latents [B, L, H*d_c] to the output (U_v folded into out_proj); otherwise U_v then out_proj
        (`out_proj` when given: the same projection called another way, e.g. the engine's direct int8 op).
        Split out so a caller that builds these projections its own way (the engine's decode loop
        fuses and quantises them) runs the same attention arithmetic.
        """
        batch, length = query.shape[:2]
        heads, r = self.num_heads, self.kept_dims
        if query_folded:
            q_kept = query[..., : heads * r].view(batch, length, heads, r).transpose(1, 2)
            q_latent = query[..., heads * r :].view(batch, length, heads, self.latent_dim).transpose(1, 2)
        else:
            query = query.view(batch, length, heads, self.head_dim).transpose(1, 2)
            q_kept, q_latent = query[..., :r], absorb_query(query[..., r:], self.up_k_heads())
        mixed, weights = latent_attention(q_latent, q_kept, latent, kept, mask, need_weights=need_weights)
        if output is not None:
            return output(mixed.transpose(1, 2).reshape(batch, length, heads * self.latent_dim)), weights
        out = expand_values(mixed, self.up_v_heads(), self.bias_v_heads())
        return (out_proj or self.out_proj)(out.reshape(batch, length, -1)), weights

    def step_weights(self, weight_of: WeightOf, fold: tuple[bool, bool] | None = None) -> StepWeights:
        """The decode step's projections as float weights (`weight_of` reads a linear, int8 ones dequantised).

        `fold` (fold U_k into the query, U_v into the output) defaults to the module's own plan.
        """
        fold_q, fold_o = self.fold_plan() if fold is None else fold
        weight, bias = weight_of(self.q_proj)
        folded = self.fold_projections((weight, bias) if fold_q else None,
                                       weight_of(self.out_proj) if fold_o else None)
        if fold_q:
            query = (folded["q_weight"], folded["q_bias"])
        else:
            query = (weight * self.scaling, None if bias is None else bias * self.scaling)
        parts = [query, weight_of(self.kv_down)] + ([weight_of(self.kept_proj)] if self.kept_proj is not None else [])
        widths = (query[0].shape[0], self.latent_dim, self.num_heads * self.kept_dims)
        output = (folded["o_weight"], folded["o_bias"]) if fold_o else None
        return StepWeights(parts, widths, fold_q, output)

    def decode_step(self, projected: torch.Tensor, widths: tuple[int, int, int], cache_layer, *,
                    query_folded: bool, output: Callable | None = None, out_proj: Callable | None = None
                    ) -> torch.Tensor:
        """One single-token step from `projected` [B, 1, sum(widths)] (the `step_weights` projections of the
        input): caches the latent and kept key dims in `cache_layer` (a transformers cache layer), then runs
        the absorbed attention; returns the output [B, 1, d]."""
        batch, length, _ = projected.shape
        query, latent, kept = projected.split(widths, dim=-1)
        kept = kept.view(batch, length, self.num_heads, self.kept_dims).transpose(1, 2)
        latent, kept = cache_layer.update(latent.unsqueeze(1), kept)
        return self.attend_latent(query, latent, kept, query_folded=query_folded, output=output, out_proj=out_proj)[0]

    def fold_plan(self, fold: str | None = None) -> tuple[bool, bool]:
        """(fold U_k into q_proj, fold U_v into out_proj) for decoding, per `fold` (default `self.fold`).

        Folding needs float `nn.Linear` projections (not e.g. int8-quantised ones); "auto" folds
        where the FLOP rule of docs/mla.md (folding) says it is cheaper.
        """
        fold = fold or self.fold
        if fold == "never":
            return False, False
        plain = [type(m) is nn.Linear for m in (self.q_proj, self.out_proj)]
        if fold == "always":
            return plain[0], plain[1]
        choice = fold_choice(self.num_heads, self.head_dim, self.kept_dims, self.latent_dim)
        return choice[0] and plain[0], choice[1] and plain[1]

    def folded_weights(self) -> dict[str, torch.Tensor | None]:
        """Folded projections for the current weights, rebuilt when any source tensor changes (e.g. training)."""
        fold_q, fold_o = self.fold_plan()
        if not (fold_q or fold_o):
            return {}
        sources = [self.q_proj.weight, self.q_proj.bias, self.up_k.weight, self.up_v.weight, self.up_v.bias,
                   self.out_proj.weight, self.out_proj.bias]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
            # training through a decode step: fold in the graph so q_proj, U_k, U_v and out_proj get gradients
            return self.fold_projections((self.q_proj.weight, self.q_proj.bias) if fold_q else None,
                                         (self.out_proj.weight, self.out_proj.bias) if fold_o else None)
        key = (fold_q, fold_o) + tuple(
            None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources
        )
        if self._folded is None or self._folded[0] != key:
            # ordinary tensors even when first built under inference_mode, so a later no-grad call can use them
            with torch.inference_mode(False), torch.no_grad():
                folded = self.fold_projections(
                    (self.q_proj.weight, self.q_proj.bias) if fold_q else None,
                    (self.out_proj.weight, self.out_proj.bias) if fold_o else None,
                )
            self._folded = (key, folded)
        return self._folded[1]

    def fold_projections(self, query: tuple | None, output: tuple | None) -> dict[str, torch.Tensor | None]:
        """U_k folded into the given float q_proj (weight, bias) and U_v into out_proj (either may be None).

        Returns "q_weight"/"q_bias" and/or "o_weight"/"o_bias" in the given weights' dtype; the engine
        passes dequantised int8 weights here, `folded_weights` the module's own.
        """
        folded: dict[str, torch.Tensor | None] = {}
        if query is not None:
            w, b = fold_query(*query, self.up_k_heads(), self.kept_dims, self.scaling)
            folded["q_weight"], folded["q_bias"] = w.to(query[0].dtype), None if b is None else b.to(query[0].dtype)
        if output is not None:
            w, b = fold_output(*output, self.up_v_heads(), self.bias_v_heads())
            folded["o_weight"], folded["o_bias"] = w.to(output[0].dtype), None if b is None else b.to(output[0].dtype)
        return folded

    def _use_absorbed(self, query_length: int, cache) -> bool:
        """Absorb only when decoding one token from a cache (prefill and training materialise)."""
        return self.decode_mode == "absorbed" and cache is not None and query_length == 1 and not self.training

    def up_k_heads(self) -> torch.Tensor:
        """U_k per head [H, h - r, d_c] (a view of up_k's weight)."""
        return self.up_k.weight.view(self.num_heads, self.comp_dims, self.latent_dim)

    def up_v_heads(self) -> torch.Tensor:
        """U_v per head [H, h, d_c] (a view of up_v's weight)."""
        return self.up_v.weight.view(self.num_heads, self.head_dim, self.latent_dim)

    def bias_v_heads(self) -> torch.Tensor | None:
        """up_v's bias per head [H, h], or None."""
        return None if self.up_v.bias is None else self.up_v.bias.view(self.num_heads, self.head_dim)


def set_decode_mode(model: nn.Module, mode: str, fold: str | None = None) -> None:
    """Choose how every MLA module decodes: "absorbed" (default) or "materialized" (for checks).

    `fold` ("auto" by default, "never" or "always") also sets whether the absorbed path folds the
    up-projections into q_proj/out_proj; None leaves each module's setting unchanged.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if fold is not None and fold not in FOLD_MODES:
        raise ValueError(f"fold must be one of {FOLD_MODES}, got {fold!r}")
    for module in model.modules():
        if isinstance(module, WhisperMLAAttention):
            module.decode_mode = mode
            if fold is not None:
                module.fold = fold
