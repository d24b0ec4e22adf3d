"""Modules of the low-rank encoder: `LowRankLinear` and `WhisperLowRankAttention`.

`LowRankLinear` is two `nn.Linear`s, `down` [rank, in] without bias and `up` [out, rank] with the
PCA-corrected bias. `WhisperLowRankAttention` is a `WhisperAttention` whose projections may be
low-rank; for encoder self-attention without mask, cache or recorded weights it computes scores and
values in the reduced dimension (paper Eq. 12 and 16) when that takes fewer FLOPs and keeps q, k and v
at one head dim (so the fused SDPA kernel still applies), and otherwise runs the ordinary HF
attention path (any attention backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention

from .math import choose_attention_path, keep_fused_kernel, reduced_scores_operands

ATTENTION_PATHS = ("auto", "reduced", "standard")


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-`rank` linear map with the interface of an `nn.Linear` of the same size."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _rank(module: nn.Module) -> int | None:
    return module.rank if isinstance(module, LowRankLinear) else None


class WhisperLowRankAttention(WhisperAttention):
    """Whisper attention whose q/k/v/out projections may be `LowRankLinear`; see the module docstring.

    `attention_path`: "auto" (by FLOP count, keeping the fused kernel; the default), "reduced" (always
    when the projections allow it) or "standard" (always the two-linear path through HF attention).
    """

    attention_path: str = "auto"

    @classmethod
    def like(cls, attn: WhisperAttention, ranks: dict[str, int]) -> WhisperLowRankAttention:
        """An uninitialised module with `attn`'s role and size; `ranks` maps "q_proj"... to a rank."""
        new = cls(
            attn.embed_dim,
            attn.num_heads,
            dropout=attn.dropout,
            is_decoder=attn.is_decoder,
            bias=attn.v_proj.bias is not None,
            is_causal=attn.is_causal,
            layer_idx=attn.layer_idx,
            config=attn.config,
        )
        for name, rank in ranks.items():
            old = getattr(new, name)
            setattr(new, name, LowRankLinear(old.in_features, old.out_features, int(rank)))
        return new

    def reduced_plan(self, length: int) -> tuple[bool, bool]:
        """(reduce scores, reduce values) for a sequence of `length` frames."""
        ranks = (_rank(self.q_proj), _rank(self.k_proj), _rank(self.v_proj))
        if self.attention_path == "standard":
            return False, False
        if self.attention_path == "reduced":
            return ranks[0] is not None and ranks[1] is not None, ranks[2] is not None
        plan = choose_attention_path(length, self.num_heads, self.head_dim, *ranks)
        return keep_fused_kernel(plan, self.head_dim, *ranks)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ):
        plain = (
            key_value_states is not None
            or past_key_values is not None
            or attention_mask is not None
            or output_attentions
            or self.is_causal
            or (self.training and self.dropout > 0)
        )
        scores, values = (False, False) if plain else self.reduced_plan(hidden_states.shape[1])
        if not (scores or values):
            return super().forward(
                hidden_states, key_value_states, past_key_values, attention_mask, output_attentions, **kwargs
            )
        return self.reduced_forward(hidden_states, scores, values), None

    def reduced_forward(self, x: torch.Tensor, reduce_scores: bool, reduce_values: bool) -> torch.Tensor:
        """Self-attention over x [B, L, d] with scores and/or values in the projections' rank space."""
        batch, length, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        split = lambda t: t.view(batch, length, heads, head_dim).transpose(1, 2)  # noqa: E731
        if reduce_scores:
            q, k = self.q_proj, self.k_proj
            query, key = reduced_scores_operands(
                q.down(x), k.down(x), q.up.weight, q.up.bias, k.up.weight, k.up.bias, heads
            )
        else:
            query, key = split(self.q_proj(x)), split(self.k_proj(x))
        if reduce_values:
            v_low = self.v_proj.down(x)
            value = v_low.unsqueeze(1).expand(batch, heads, length, v_low.shape[-1])
        else:
            value = split(self.v_proj(x))
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scaling)
        if reduce_values:  # rows of the softmax sum to 1, so the bias passes through (Eq. 16)
            up = self.v_proj.up
            b_v = up.weight.view(heads, head_dim, -1)
            out = torch.einsum("bhlk,hdk->bhld", out, b_v) + up.bias.view(1, heads, 1, head_dim)
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.out_proj(out)
