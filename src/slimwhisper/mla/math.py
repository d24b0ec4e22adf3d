"""Pure tensor functions for MHA -> MLA conversion and latent attention.

Nothing here knows about modules or configs: tensors and ints in, tensors out. Shapes are noted as
B batch, H heads, h head dim, r kept key dims per head, d model width, d_c latent width, T cached
tokens, L query tokens.
"""
from __future__ import annotations

import torch

from ..errors import SlimWhisperError


def kept_dim_indices(
    selection: str, num_heads: int, head_dim: int, kept: int, score: torch.Tensor | None = None
) -> torch.Tensor:
    """Which key dims of each head stay exact: a sorted LongTensor [H, r].

    "uniform" spaces r dims evenly over the head; "high"/"low" take MHA2MLA's rotate-half bands
    (the first / last r/2 dims of each half of the head); "2norm" takes the r dims with the largest
    `score` [H, h] (E|q_i| * E|k_i| measured on calibration audio).
    """
    if kept == 0:
        return torch.zeros(num_heads, 0, dtype=torch.long)
    if not 0 < kept <= head_dim:
        raise SlimWhisperError(f"kept_dims must be in 1..{head_dim}, got {kept}")
    half = head_dim // 2
    if selection == "uniform":
        one = (torch.arange(kept, dtype=torch.float64) * head_dim / kept).floor().long()
    elif selection in ("high", "low"):
        k2 = kept // 2
        start = 0 if selection == "high" else half - k2
        one = torch.cat([torch.arange(start, start + k2), torch.arange(half + start, half + start + k2)])
    elif selection == "2norm":
        if score is None or score.shape != (num_heads, head_dim):
            raise SlimWhisperError("selection '2norm' needs calibration statistics; pass calibration audio")
        return score.topk(kept, dim=-1).indices.sort(dim=-1).values
    else:
        raise SlimWhisperError(f"unknown selection {selection!r}")
    return one.unsqueeze(0).expand(num_heads, -1).clone()


def split_head_dims(kept_idx: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row indices (head-major) of the kept dims [H*r] and of the compressed dims [H*(h-r)]."""
    num_heads = kept_idx.shape[0]
    mask = torch.zeros(num_heads, head_dim, dtype=torch.bool)
    mask.scatter_(1, kept_idx, True)
    rows = torch.arange(num_heads * head_dim).view(num_heads, head_dim)
    return rows[mask], rows[~mask]  # boolean indexing keeps head-major, ascending order


def head_permutation(kept_idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row order [d] that lays each head out as [its kept dims | its compressed dims].

    Permuting q and k rows *within* a head leaves every per-head dot product unchanged; permuting
    across heads would mix heads (the original Whisper-MLA code's bug; docs/mla.md, head layout).
    """
    kept_rows, comp_rows = split_head_dims(kept_idx, head_dim)
    num_heads, r = kept_idx.shape
    per_head = torch.cat([kept_rows.view(num_heads, r), comp_rows.view(num_heads, head_dim - r)], dim=1)
    return per_head.reshape(-1)


def psd_sqrt(matrix: torch.Tensor, rel_floor: float = 1e-10) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix, eigenvalues floored for stability."""
    evals, evecs = torch.linalg.eigh(matrix)
    floor = evals.max().clamp_min(0) * rel_floor
    return (evecs * evals.clamp_min(floor).sqrt()) @ evecs.T


def low_rank_projection(
    weight: torch.Tensor, rank: int, second_moment: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factorisation weight ~= up @ down, optionally weighted by the input statistics.

    Minimises E||(W - up @ down) x||^2 over inputs x with E[x x^T] = `second_moment` (identity when
    None, i.e. the plain weight SVD). The solution projects W's outputs onto the top left singular
    vectors U_k of W M^{1/2}: up = U_k (orthonormal columns), down = U_k^T W. Computed in float64.

    Returns:
        down [rank, d_in] and up [d_out, rank], in float64.
    """
    w = weight.double()
    u, _, _ = torch.linalg.svd(weighted_target(w, second_moment), full_matrices=False)
    up = u[:, :rank]
    return up.T @ w, up


def weighted_target(weight: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """W M^{1/2} in float64 (W itself when M is None): the matrix whose SVD `low_rank_projection` truncates.

    Shared with `kv_spectrum` so the widths a budget allocates are judged on exactly the matrix that
    the conversion then factorises.
    """
    w = weight.double()
    return w if second_moment is None else w @ psd_sqrt(second_moment.double())


def kv_spectrum(w_kc: torch.Tensor, w_v: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (descending, float64) of the joint weighted [W_kc; W_v] that `factorize_kv` truncates.

    A latent of width r leaves E||([W_kc; W_v] - U D) x||^2 = sum_{i>r} sigma_i^2 (Eckart-Young), so
    the spectrum alone prices every width, which is what a cache-budget allocation needs.
    """
    return torch.linalg.svdvals(weighted_target(torch.cat([w_kc, w_v]), second_moment))


def factorize_kv(
    w_kc: torch.Tensor, w_v: torch.Tensor, d_c: int, second_moment: torch.Tensor | None = None, split: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factorise the compressed key rows and the value rows through one latent of width d_c.

    joint (default): [W_kc; W_v] ~= [U_k; U_v] D with a shared down-projection D [d_c, d].
    split: W_kc ~= U_k D_k and W_v ~= U_v D_v separately (d_c split in halves); stacked as
    D = [D_k; D_v] with block-diagonal up-projections, so the module and its cache are unchanged.

    Returns:
        down [d_c, d], up_k [rows(W_kc), d_c], up_v [d, d_c]; float64.
    """
    if split:
        d_ck = d_c // 2
        if d_ck == 0 or w_kc.shape[0] == 0:
            raise SlimWhisperError(f"split factorisation needs a latent >= 2 and compressed key dims (d_c={d_c})")
        down_k, up_k_part = low_rank_projection(w_kc, min(d_ck, w_kc.shape[0]), second_moment)
        down_v, up_v_part = low_rank_projection(w_v, d_c - down_k.shape[0], second_moment)
        down = torch.cat([down_k, down_v])
        up_k = torch.cat([up_k_part, up_k_part.new_zeros(up_k_part.shape[0], down_v.shape[0])], dim=1)
        up_v = torch.cat([up_v_part.new_zeros(up_v_part.shape[0], down_k.shape[0]), up_v_part], dim=1)
        return down, up_k, up_v
    down, up = low_rank_projection(torch.cat([w_kc, w_v]), d_c, second_moment)
    return down, up[: w_kc.shape[0]], up[w_kc.shape[0] :]


def absorb_query(q_comp: torch.Tensor, up_k: torch.Tensor) -> torch.Tensor:
    """q~ = U_k^T q_c for every head in one batched matmul over heads: [B, H, L, c] -> [B, H, L, d_c]."""
    batch, heads, length, comp = q_comp.shape
    flat = q_comp.permute(1, 0, 2, 3).reshape(heads, batch * length, comp)
    return torch.bmm(flat, up_k).view(heads, batch, length, -1).permute(1, 0, 2, 3)


def expand_values(mixed: torch.Tensor, up_v: torch.Tensor, bias_v: torch.Tensor | None) -> torch.Tensor:
    """o = U_v z + b_v per head, one batched matmul over heads: z [B, H, L, d_c] -> o [B, L, H, h]."""
    batch, heads, length, d_c = mixed.shape
    flat = mixed.permute(1, 0, 2, 3).reshape(heads, batch * length, d_c)
    out = torch.bmm(flat, up_v.transpose(1, 2)).view(heads, batch, length, -1).permute(1, 2, 0, 3)
    return out if bias_v is None else out + bias_v


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (True = attend) or additive mask as an additive float mask."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def prefer_sdpa(latent: torch.Tensor) -> bool:
    """Whether the fused SDPA kernel beats two plain matmuls for reading this latent cache [B, 1, T, d_c].

    On a CPU with several threads, SDPA over the latent (one key "head", the heads as query rows)
    scales badly with threads: it wins only on short caches at small batch. So a multi-threaded CPU
    takes the matmuls once batch x tokens reaches 400; GPUs and single threads keep SDPA.
    """
    if latent.device.type != "cpu" or torch.get_num_threads() == 1:
        return True
    return latent.shape[0] * latent.shape[-2] < 400


def latent_attention(
    q_latent: torch.Tensor,
    q_kept: torch.Tensor,
    latent: torch.Tensor,
    k_kept: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    need_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cache-reading core of absorbed attention: mixed latent z [B, H, L, d_c] and probabilities.

    The latent is shared by every head, so the latent part of the score is multi-query attention
    with the heads as query rows: scores [B, H*L, T] = q~ [B, H*L, d_c] @ c^T [B, d_c, T], one bmm
    per batch that reads the cache once (a broadcast `[B, H, L, d_c] @ [B, 1, d_c, T]` matmul would
    first copy the latent H times, which cost more than the whole MHA step). Cache tensors may be
    strided views (e.g. length-sliced preallocated buffers): nothing here needs them contiguous.

    Args:
        q_latent: absorbed queries q~ = U_k^T q_c [B, H, L, d_c] (scale already applied).
        q_kept: the kept-dim part of the queries [B, H, L, r] (r may be 0).
        latent: cached latent [B, 1, T, d_c]; k_kept: cached kept key dims [B, H, T, r].
        attention_mask: additive float or boolean (True = attend) mask broadcastable to [B, H, L, T].
        need_weights: return the attention probabilities; False may take the fused SDPA kernel
            (latent as both key and value, scale 1; see `prefer_sdpa`) and returns None for them.
    """
    batch, heads, length, _ = q_latent.shape
    r, tokens = k_kept.shape[-1], latent.shape[-2]
    fused = not need_weights and prefer_sdpa(latent)
    q_flat = q_latent.reshape(batch, heads * length, -1)  # [B, H*L, d_c]
    c = latent[:, 0]  # [B, T, d_c], a view
    bias = q_kept @ k_kept.transpose(-1, -2) if r else None  # exact part of the score [B, H, L, T]
    mask = None if attention_mask is None else attention_mask[..., :tokens]
    if fused:
        if mask is not None:
            mask = mask.expand(batch, heads, length, tokens)
            if bias is not None:
                bias = bias + _additive(mask, bias.dtype)
            else:
                bias = mask if mask.dtype == torch.bool else mask.to(q_latent.dtype)
        elif bias is not None:
            bias = bias.expand(batch, heads, length, tokens)
        bias = None if bias is None else bias.reshape(batch, 1, heads * length, tokens)
        mixed = torch.nn.functional.scaled_dot_product_attention(
            q_flat.unsqueeze(1), c.unsqueeze(1), c.unsqueeze(1), attn_mask=bias, scale=1.0
        )  # [B, 1, H*L, d_c]
        return mixed.view(batch, heads, length, -1), None
    scores = torch.bmm(q_flat, c.transpose(1, 2)).view(batch, heads, length, tokens)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.float().softmax(dim=-1).to(q_latent.dtype)
    # rows of probs sum to 1, so the value bias adds after mixing the latent: z = sum_t p_t c_t
    mixed = torch.bmm(probs.reshape(batch, heads * length, tokens), c).view(batch, heads, length, -1)
    return mixed, probs if need_weights else None


def absorbed_attention(
    q: torch.Tensor,
    latent: torch.Tensor,
    k_kept: torch.Tensor,
    up_k: torch.Tensor,
    up_v: torch.Tensor,
    bias_v: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    need_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention read straight from the latent cache, never up-projecting it (docs/mla.md, weight absorption).

    Absorbs U_k into the queries, runs `latent_attention`, then expands the mixed latent with U_v.

    Args:
        q: pre-scaled queries [B, H, L, h], each head laid out as [kept r | compressed h-r].
        latent: cached latent [B, 1, T, d_c].
        k_kept: cached kept key dims [B, H, T, r].
        up_k: [H, h-r, d_c] per-head key up-projection; up_v: [H, h, d_c]; bias_v: [H, h] or None.
        attention_mask, need_weights: as in `latent_attention`.

    Returns:
        output [B, L, H, h] and attention probabilities [B, H, L, T] (None unless need_weights).
    """
    r = k_kept.shape[-1]
    mixed, probs = latent_attention(
        absorb_query(q[..., r:], up_k), q[..., :r], latent, k_kept, attention_mask, need_weights=need_weights
    )
    return expand_values(mixed, up_v, bias_v), probs


def fold_choice(num_heads: int, head_dim: int, kept_dims: int, latent_dim: int) -> tuple[bool, bool]:
    """Whether folding U_k into W_q and U_v into W_o saves decode FLOPs (docs/mla.md): (fold query, fold output).

    Per step the query side costs d*d_kc + d_kc*d_c unfolded against d*H*d_c folded, and the output
    side d*d_c + d^2 against H*d_c*d, so fold the query iff H*d_c < d_kc*(1 + d_c/d) and the output
    iff (H-1)*d_c < d (d model width, d_kc = H*(h - r) compressed key dims). Folding only pays for
    small latents (tiny at d_c = 48); at the usual 75-87.5% reductions of Whisper it does not.
    """
    d = num_heads * head_dim
    d_kc = num_heads * (head_dim - kept_dims)
    fold_q = num_heads * latent_dim < d_kc * (1 + latent_dim / d)
    fold_o = (num_heads - 1) * latent_dim < d
    return fold_q, fold_o


def fold_query(
    weight: torch.Tensor, bias: torch.Tensor | None, up_k: torch.Tensor, kept_dims: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection x -> [scaled kept queries (H*r) | absorbed queries q~ (H*d_c)] (docs/mla.md, folding).

    Args:
        weight: q_proj weight [d, d_in], rows per head laid out [kept r | compressed h-r]; bias [d] or None.
        up_k: [H, h-r, d_c]; scaling: the attention scale that q_proj's output is multiplied by.

    Returns:
        weight [H*(r + d_c), d_in] and bias (or None), in float64.
    """
    heads, comp, _ = up_k.shape
    d_in = weight.shape[-1]
    w = weight.double().view(heads, kept_dims + comp, d_in) * scaling
    u = up_k.double()
    w_kept, w_lat = w[:, :kept_dims].reshape(heads * kept_dims, d_in), torch.einsum("hcl,hci->hli", u, w[:, kept_dims:])
    folded_w = torch.cat([w_kept, w_lat.reshape(-1, d_in)])
    if bias is None:
        return folded_w, None
    b = bias.double().view(heads, kept_dims + comp) * scaling
    folded_b = torch.cat([b[:, :kept_dims].reshape(-1), torch.einsum("hcl,hc->hl", u, b[:, kept_dims:]).reshape(-1)])
    return folded_w, folded_b


def fold_output(
    weight: torch.Tensor, bias: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection from the mixed latents z [H*d_c] straight to the output (docs/mla.md, folding).

    y = W_o [U_v^1 z^1 + b_v^1; ...] + b_o = sum_j (W_o^j U_v^j) z^j + (W_o b_v + b_o).

    Args:
        weight: out_proj weight [d_out, H*h]; bias [d_out] or None; up_v [H, h, d_c]; bias_v [H, h] or None.

    Returns:
        weight [d_out, H*d_c] and bias (or None), in float64.
    """
    heads, head_dim, d_c = up_v.shape
    w = weight.double().view(-1, heads, head_dim)
    folded_w = torch.einsum("ohe,hel->ohl", w, up_v.double()).reshape(w.shape[0], heads * d_c)
    folded_b = None if bias is None else bias.double()
    if bias_v is not None:
        extra = weight.double() @ bias_v.double().reshape(-1)
        folded_b = extra if folded_b is None else folded_b + extra
    return folded_w, folded_b
