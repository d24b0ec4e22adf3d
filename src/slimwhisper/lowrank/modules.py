"""Modules of the low-rank encoder: `LowRankLinear`, `WhisperLowRankAttention`, `WhisperLowRankEncoderLayer`.

`LowRankLinear` is two `nn.Linear`s, `down` [rank, in] without bias and `up` [out, rank] with the
PCA-corrected bias. `WhisperLowRankAttention` is a `WhisperAttention` whose projections may be
low-rank; for encoder self-attention without mask, cache or recorded weights it computes scores and
values in the reduced dimension (paper Eq. 12 and 16) when that takes fewer FLOPs and keeps q, k and v
at one head dim (so the fused SDPA kernel still applies), and otherwise the same attention in the head
dim with one SDPA call on strided views of the projections. Anything else (cross-attention, a cache, a
mask, recorded weights) runs the ordinary HF attention path (any attention backend). Its heads may also be
narrowed (`narrow`: fewer dimensions per head for scores and values, so the L^2 terms shrink too).
`WhisperLowRankEncoderLayer` is a `WhisperEncoderLayer` whose MLP, when low-rank, runs in row blocks at
inference (see its docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperEncoderLayer

from .math import choose_attention_path, keep_fused_kernel, reduced_scores_operands

ATTENTION_PATHS = ("auto", "reduced", "standard")
# bytes of the MLP's wide activation one row block of `WhisperLowRankEncoderLayer` holds: a few MiB stays in
# this class of CPU's last-level cache, and well under glibc's 32 MiB mmap ceiling so blocks reuse heap memory
MLP_BLOCK_BYTES = 4 << 20


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


def _has_bias(module: nn.Module) -> bool:
    return (module.up if isinstance(module, LowRankLinear) else module).bias is not None


def _rank(module: nn.Module) -> int | None:
    return module.rank if isinstance(module, LowRankLinear) else None


class WhisperLowRankAttention(WhisperAttention):
    """Whisper attention whose q/k/v/out projections may be `LowRankLinear`; see the module docstring.

    `attention_path`: "auto" (by FLOP count, keeping the fused kernel; the default), "reduced" (always
    when the projections allow it) or "standard" (always the two-linear path through HF attention, the
    reference the others are tested against).
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
            bias=_has_bias(attn.v_proj),
            is_causal=attn.is_causal,
            layer_idx=attn.layer_idx,
            config=attn.config,
        )
        if attn.head_dim != new.head_dim:
            new.narrow(attn.head_dim)
        for name, rank in ranks.items():
            old = getattr(new, name)
            setattr(new, name, LowRankLinear(old.in_features, old.out_features, int(rank)))
        return new

    def narrow(self, head_dim: int) -> None:
        """Give every head `head_dim` dimensions for scores and values (uninitialised dense projections of the
        new widths). The scaling stays the original's 1/sqrt(head dim): the narrowed weights keep its scores."""
        width = self.num_heads * head_dim
        bias = _has_bias(self.v_proj)
        self.head_dim = head_dim
        self.q_proj = nn.Linear(self.embed_dim, width, bias=bias)
        self.k_proj = nn.Linear(self.embed_dim, width, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, width, bias=bias)
        self.out_proj = nn.Linear(width, self.embed_dim, bias=bias)

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
        if plain or self.attention_path == "standard":
            return super().forward(
                hidden_states, key_value_states, past_key_values, attention_mask, output_attentions, **kwargs
            )
        return self.reduced_forward(hidden_states, *self.reduced_plan(hidden_states.shape[1])), None

    def reduced_forward(self, x: torch.Tensor, reduce_scores: bool, reduce_values: bool) -> torch.Tensor:
        """Self-attention over x [B, L, d] with scores and/or values in the projections' rank space.

        With neither reduced it is the two-linear path without HF's copies: the heads stay strided views of
        the projections' outputs (SDPA reads them as they are), and the softmax scale goes to SDPA instead
        of a separate multiply of the queries.
        """
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


class WhisperLowRankEncoderLayer(WhisperEncoderLayer):
    """An encoder layer with a low-rank fc1 or fc2 whose MLP runs in row blocks at inference.

    The MLP's wide [rows, ffn] activation is written by fc1, read and rewritten by the activation and read
    by fc2; over a whole 30-s window it is the layer's largest tensor and goes through memory three
    times. A low-rank pair does few multiplies per byte of it, so that traffic is most of a thin pair's
    time. In blocks of rows the wide block stays in cache from fc1 to fc2. Rows are independent in an
    MLP, so blocking changes no arithmetic (float results are bit for bit the same; a dynamic int8
    linear takes one activation scale per block). With gradients enabled (training) the layer runs the
    ordinary full-width path. The original's dense layers are left as they are.
    """

    @classmethod
    def adopt(cls, layer: WhisperEncoderLayer) -> WhisperLowRankEncoderLayer:
        """A layer of this class holding `layer`'s submodules (same names, so state dicts are unchanged)."""
        with torch.device("meta"):
            new = cls(layer.self_attn.config)
        for name, child in layer.named_children():
            setattr(new, name, child)
        new.train(layer.training)
        return new

    def block_rows(self, x: torch.Tensor) -> int | None:
        """Rows per MLP block for x, or None for one full-width pass: gradients on, active dropout, or not a
        CPU, whose caches are what blocking is for (a GPU runs one wide kernel better than many small ones)."""
        if torch.is_grad_enabled() or (self.training and self.activation_dropout > 0) or x.device.type != "cpu":
            return None
        return max(1, MLP_BLOCK_BYTES // (self.fc1.out_features * x.element_size()))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(act(fc1(x))) for x [B, L, d]: in row blocks when `block_rows` gives some, else in one pass."""
        step = self.block_rows(x)
        if step is None:
            x = self.activation_fn(self.fc1(x))
            x = nn.functional.dropout(x, p=self.activation_dropout, training=self.training)
            return self.fc2(x)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([self.fc2(self.activation_fn(self.fc1(rows[i:i + step]))) for i in range(0, len(rows), step)])
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """`WhisperEncoderLayer.forward` with the MLP through `mlp`."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.final_layer_norm(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        if hidden_states.dtype == torch.float16:
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states
