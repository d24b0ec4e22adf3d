"""Modules of the low-rank encoder: `LowRankLinear` and `WhisperLowRankAttention`.

`LowRankLinear` is two `nn.Linear`s, `down` [rank, in] without bias and `up` [out, rank] with the
PCA-corrected bias. `WhisperLowRankAttention` is a `WhisperAttention` whose projections may be
low-rank. For encoder self-attention without mask, cache or recorded weights it runs its own path:
the `down` halves of the low-rank q, k and v read the same input, so they run as one matrix product
(one wide product keeps the CPU's matrix kernels busier than two or three thin ones), and scores and
values are computed in the reduced dimension (paper Eq. 12 and 16) when that takes fewer FLOPs and
keeps q, k and v at one head dim (so the fused SDPA kernel still applies). Anything else (and
`attention_path = "standard"`) runs the ordinary HF attention path (any attention backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention

from .math import choose_attention_path, keep_fused_kernel, reduced_scores_operands

ATTENTION_PATHS = ("auto", "reduced", "standard")
# The joint down product is no module call, so `bench encoder`'s profile finds it by this range name.
PROFILE_RANGE = "slimwhisper::linear_lowrank"


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
        if plain or self.attention_path == "standard" or not self.low_rank_inputs():
            return super().forward(
                hidden_states, key_value_states, past_key_values, attention_mask, output_attentions, **kwargs
            )
        return self.reduced_forward(hidden_states, *self.reduced_plan(hidden_states.shape[1])), None

    def low_rank_inputs(self) -> list[str]:
        """Names of the low-rank projections among q, k and v (those read the layer's input)."""
        return [n for n in ("q_proj", "k_proj", "v_proj") if isinstance(getattr(self, n), LowRankLinear)]

    def downs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `down` outputs of the low-rank q/k/v projections, as one matrix product where they allow it."""
        names = self.low_rank_inputs()
        modules = [getattr(self, n).down for n in names]
        call = self._stacked_down(modules) if len(names) > 1 else None
        if call is None:
            return {n: m(x) for n, m in zip(names, modules)}
        with torch.profiler.record_function(PROFILE_RANGE):
            joint = call(x)
        return dict(zip(names, joint.split([m.out_features for m in modules], dim=-1)))

    def _stacked_down(self, modules: list[nn.Module]):
        """One callable computing [m1(x) | m2(x) | ...]: float weights concatenated per call (they may be
        training), int8 rows stacked once and kept (an int8 model is frozen); None if neither applies."""
        if all(type(m) is nn.Linear and m.bias is None for m in modules):
            weight = torch.cat([m.weight for m in modules])
            return lambda x: F.linear(x, weight)
        key = tuple(id(m) for m in modules)
        if getattr(self, "_int8_down", (None,))[0] != key:
            from ..engine.quantize import stack_int8_rows  # the engine imports this module

            self._int8_down = (key, stack_int8_rows(modules))
        return self._int8_down[1]

    def reduced_forward(self, x: torch.Tensor, reduce_scores: bool, reduce_values: bool) -> torch.Tensor:
        """Self-attention over x [B, L, d] with scores and/or values in the projections' rank space."""
        batch, length, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        low = self.downs(x)

        def full(name: str) -> torch.Tensor:  # [B, H, L, head_dim]
            proj = getattr(self, name)
            out = proj.up(low[name]) if name in low else proj(x)
            return out.view(batch, length, heads, head_dim).transpose(1, 2)

        if reduce_scores:
            q, k = self.q_proj, self.k_proj
            query, key = reduced_scores_operands(
                low["q_proj"], low["k_proj"], q.up.weight, q.up.bias, k.up.weight, k.up.bias, heads
            )
        else:
            query, key = full("q_proj"), full("k_proj")
        if reduce_values:
            v_low = low["v_proj"]
            value = v_low.unsqueeze(1).expand(batch, heads, length, v_low.shape[-1])
        else:
            value = full("v_proj")
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scaling)
        if reduce_values:  # rows of the softmax sum to 1, so the bias passes through (Eq. 16)
            up = self.v_proj.up
            b_v = up.weight.view(heads, head_dim, -1)
            out = torch.einsum("bhlk,hdk->bhld", out, b_v) + up.bias.view(1, heads, 1, head_dim)
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.out_proj(out)
