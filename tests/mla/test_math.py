"""Unit tests of the pure MLA math (random matrices, no model)."""
from __future__ import annotations

import pytest
import torch

from slimwhisper.errors import SlimWhisperError
from slimwhisper.mla.math import (
    absorbed_attention,
    factorize_kv,
    fold_choice,
    fold_output,
    fold_query,
    head_permutation,
    kept_dim_indices,
    latent_attention,
    low_rank_projection,
    prefer_sdpa,
    split_head_dims,
)


@pytest.mark.parametrize("selection", ["uniform", "high", "low"])
def test_kept_dims_are_per_head_and_sorted(selection):
    # the fixed selections keep the same sorted dims in every head
    dims = {"uniform": [0, 4, 8, 12], "high": [0, 1, 8, 9], "low": [6, 7, 14, 15]}[selection]
    assert kept_dim_indices(selection, num_heads=3, head_dim=16, kept=4).tolist() == [dims] * 3


def test_kept_dim_bands_follow_mha2mla():
    assert kept_dim_indices("high", 1, 16, 4).tolist() == [[0, 1, 8, 9]]
    assert kept_dim_indices("low", 1, 16, 4).tolist() == [[6, 7, 14, 15]]
    assert kept_dim_indices("uniform", 1, 16, 4).tolist() == [[0, 4, 8, 12]]


def test_2norm_takes_top_scores_per_head():
    score = torch.zeros(2, 8)
    score[0, [1, 5]] = 1.0
    score[1, [0, 7]] = 1.0
    assert kept_dim_indices("2norm", 2, 8, 2, score).tolist() == [[1, 5], [0, 7]]
    with pytest.raises(SlimWhisperError):
        kept_dim_indices("2norm", 2, 8, 2, None)


def test_head_permutation_keeps_heads_and_dot_products():
    torch.manual_seed(0)
    heads, h = 4, 8
    kept = kept_dim_indices("2norm", heads, h, 3, torch.rand(heads, h))
    perm = head_permutation(kept, h)
    assert sorted(perm.tolist()) == list(range(heads * h))
    assert bool((perm.view(heads, h) // h == torch.arange(heads)[:, None]).all()), "a row left its head"
    q, k = torch.randn(heads * h), torch.randn(heads * h)
    per_head = lambda a, b: (a.view(heads, h) * b.view(heads, h)).sum(-1)  # noqa: E731
    torch.testing.assert_close(per_head(q[perm], k[perm]), per_head(q, k))
    kept_rows, comp_rows = split_head_dims(kept, h)
    expected_kept = (kept.sort(dim=1).values + torch.arange(heads)[:, None] * h).reshape(-1)  # head-major rows
    assert kept_rows.tolist() == expected_kept.tolist()
    assert comp_rows.tolist() == sorted(set(range(heads * h)) - set(expected_kept.tolist()))


def test_full_rank_factorisation_is_exact_and_error_falls_with_rank():
    torch.manual_seed(0)
    d = 24
    w_kc, w_v = torch.randn(16, d), torch.randn(d, d)
    errors = []
    for rank in (6, 12, 18, 24):
        down, up_k, up_v = factorize_kv(w_kc, w_v, rank)
        approx = torch.cat([up_k, up_v]) @ down
        errors.append(float((approx - torch.cat([w_kc, w_v]).double()).norm()))
    assert errors[-1] < 1e-9
    assert errors == sorted(errors, reverse=True)
    # Eckart-Young: the best rank-r error is the norm of the singular values left out
    singular = torch.linalg.svdvals(torch.cat([w_kc, w_v]).double())
    expected = [float(singular[rank:].norm()) for rank in (6, 12, 18, 24)]
    assert errors == pytest.approx(expected, abs=1e-9)


def test_activation_weighting_wins_on_its_own_distribution():
    """Weighted by E[xx^T], the factorisation must beat the weight-only SVD on inputs from that distribution."""
    torch.manual_seed(0)
    d, rank = 32, 8
    w = torch.randn(48, d).double()
    mix = torch.randn(d, d).double() * torch.logspace(0, -3, d).double()  # strongly anisotropic inputs
    x = torch.randn(4000, d).double() @ mix.T
    moment = x.T @ x / x.shape[0]
    err = lambda down, up: float(((x @ w.T) - (x @ down.T) @ up.T).pow(2).mean())  # noqa: E731
    weighted = err(*low_rank_projection(w, rank, moment))
    plain = err(*low_rank_projection(w, rank))
    assert weighted < 0.5 * plain


def test_split_factorisation_uses_separate_latents():
    torch.manual_seed(0)
    down, up_k, up_v = factorize_kv(torch.randn(8, 16), torch.randn(16, 16), 8, split=True)
    assert down.shape == (8, 16)
    assert float(up_k[:, 4:].abs().max()) == 0.0 and float(up_v[:, :4].abs().max()) == 0.0


def test_absorbed_attention_equals_materialised():
    torch.manual_seed(0)
    b, heads, h, r, d_c, t = 2, 3, 8, 2, 10, 7
    q = torch.randn(b, heads, 1, h)
    latent, kept = torch.randn(b, 1, t, d_c), torch.randn(b, heads, t, r)
    up_k, up_v, bias_v = torch.randn(heads, h - r, d_c), torch.randn(heads, h, d_c), torch.randn(heads, h)
    mask = torch.zeros(b, 1, 1, t)
    mask[0, ..., :2] = float("-inf")  # padding on the first row
    out, probs = absorbed_attention(q, latent, kept, up_k, up_v, bias_v, mask)
    keys = torch.cat([kept, torch.einsum("bxtd,hcd->bhtc", latent, up_k)], dim=-1)
    values = torch.einsum("bxtd,hed->bhte", latent, up_v) + bias_v[None, :, None, :]
    ref_probs = (q @ keys.transpose(-1, -2) + mask).softmax(-1)
    ref = (ref_probs @ values).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    assert float(probs[0, ..., :2].abs().max()) == 0.0


def _materialised(q, latent, kept, up_k, up_v, bias_v, mask):
    keys = torch.cat([kept, torch.einsum("bxtd,hcd->bhtc", latent, up_k)], dim=-1)
    values = torch.einsum("bxtd,hed->bhte", latent, up_v) + bias_v[None, :, None, :]
    scores = q @ keys.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ values).transpose(1, 2)


@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "causal"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_absorbed_attention_on_strided_cache_views(r, mask_kind, need_weights):
    """Length-sliced views of preallocated buffers (a static cache) give the materialised result, any mask."""
    torch.manual_seed(1)
    b, heads, h, d_c, t, cap = 3, 4, 8, 12, 9, 16
    length = 3 if mask_kind == "causal" else 1
    q = torch.randn(b, heads, length, h) * 2
    latent_buf, kept_buf = torch.randn(b + 1, 1, cap, d_c), torch.randn(b + 1, heads, cap, r)
    latent, kept = latent_buf[1:, :, :t], kept_buf[1:, :, :t]  # sliced along batch and length
    assert not latent.is_contiguous() and (r == 0 or not kept.is_contiguous())
    up_k, up_v, bias_v = torch.randn(heads, h - r, d_c), torch.randn(heads, h, d_c), torch.randn(heads, h)
    mask = None
    if mask_kind == "float":
        mask = torch.zeros(b, 1, 1, t)
        mask[0, ..., :4] = float("-inf")  # a left-padded row
    elif mask_kind == "bool":
        mask = torch.ones(b, 1, 1, t + 2, dtype=torch.bool)  # longer than the cache: sliced to T
        mask[1, ..., :2] = False
    elif mask_kind == "causal":
        mask = torch.ones(t, t, dtype=torch.bool).tril()[-length:][None, None].expand(b, 1, -1, -1)
    out, probs = absorbed_attention(q, latent, kept, up_k, up_v, bias_v, mask, need_weights=need_weights)
    ref = _materialised(q, latent, kept, up_k, up_v, bias_v, None if mask is None else mask[..., :t])
    assert out.shape == (b, length, heads, h)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (probs is None) == (not need_weights)
    if probs is not None:
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, heads, length))


def test_fold_choice_follows_spec_examples():
    """docs/mla.md: tiny (H=6, h=64) with r=8, d_c=48 folds both; small (H=12) with r=8, d_c=96 folds neither."""
    assert fold_choice(6, 64, 8, 48) == (True, True)
    assert fold_choice(12, 64, 8, 96) == (False, False)
    assert fold_choice(6, 64, 0, 192) == (False, False)  # tiny at a 75% reduction
    assert fold_choice(6, 64, 0, 76) == (True, True) and fold_choice(6, 64, 0, 77) == (False, False)


@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_projections_equal_the_unfolded_chain(r, bias):
    torch.manual_seed(2)
    heads, h, d_c, d_in, scale = 4, 8, 5, 32, 0.3
    w_q, b_q = torch.randn(heads * h, d_in), torch.randn(heads * h) if bias else None
    up_k, up_v = torch.randn(heads, h - r, d_c), torch.randn(heads, h, d_c)
    b_v = torch.randn(heads, h) if bias else None
    w_o, b_o = torch.randn(d_in, heads * h), torch.randn(d_in) if bias else None
    x, z = torch.randn(7, d_in, dtype=torch.float64), torch.randn(7, heads, d_c, dtype=torch.float64)
    q = (torch.nn.functional.linear(x, w_q.double(), None if b_q is None else b_q.double()) * scale).view(7, heads, h)
    absorbed = torch.einsum("nhc,hcl->nhl", q[..., r:], up_k.double())
    ref_q = torch.cat([q[..., :r].reshape(7, -1), absorbed.reshape(7, -1)], dim=1)
    wq_f, bq_f = fold_query(w_q, b_q, up_k, r, scale)
    torch.testing.assert_close(torch.nn.functional.linear(x, wq_f, bq_f), ref_q)
    o = torch.einsum("nhl,hel->nhe", z, up_v.double()) + (0 if b_v is None else b_v.double())
    ref_y = torch.nn.functional.linear(o.reshape(7, -1), w_o.double(), None if b_o is None else b_o.double())
    wo_f, bo_f = fold_output(w_o, b_o, up_v, b_v)
    torch.testing.assert_close(torch.nn.functional.linear(z.reshape(7, -1), wo_f, bo_f), ref_y)


@pytest.mark.parametrize("kept", [0, 2])
def test_latent_attention_kernels_agree_and_the_choice_follows_threads_and_size(kept):
    """SDPA and the two-matmul form give the same mixed latent (with a causal mask too); a multi-threaded
    CPU switches to the matmuls once batch x tokens reaches 400, a single thread keeps SDPA."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, tokens, d_c = 2, 3, 250, 8
    q_lat, q_kept = torch.randn(batch, heads, 2, d_c, generator=gen), torch.randn(batch, heads, 2, kept, generator=gen)
    latent, k_kept = torch.randn(batch, 1, tokens, d_c, generator=gen), torch.randn(batch, heads, tokens, kept,
                                                                                   generator=gen)
    causal = torch.ones(2, tokens, dtype=torch.bool).tril(tokens - 2)[None, None]
    threads = torch.get_num_threads()
    try:
        for mask in (None, causal):
            reference, probs = latent_attention(q_lat, q_kept, latent, k_kept, mask, need_weights=True)
            # scores: the latent shared by every head, plus the kept dims' exact part; values: the latent itself
            scores = q_lat @ latent.transpose(-1, -2) + q_kept @ k_kept.transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(reference, scores.softmax(-1) @ latent, atol=1e-5, rtol=1e-5)
            for n in (1, 2):
                torch.set_num_threads(n)
                assert prefer_sdpa(latent) == (n == 1)  # 2 x 250 = 500 >= 400
                assert prefer_sdpa(latent[:, :, :150]) is True  # 300 < 400
                mixed, none = latent_attention(q_lat, q_kept, latent, k_kept, mask, need_weights=False)
                assert none is None
                torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
