"""Pure functions of the low-rank encoder: rank choice (incl. LiteASR's edge bug), PCA factors, attention kernels."""
from __future__ import annotations

import pytest
import torch

from slimwhisper.errors import ConfigVersionError, SlimWhisperError
from slimwhisper.lowrank import LowRankConfig, parse_theta
from slimwhisper.lowrank.math import (
    attention_flops,
    choose_attention_path,
    energy_rank,
    fixed_rank,
    keep_fused_kernel,
    pca_basis,
    pca_factors,
    reduced_scores_operands,
)


def test_rank_is_smallest_granule_multiple_strictly_above_theta():
    values = torch.tensor([4.0] * 16 + [1.0] * 16 + [0.0] * 32)  # squared energy: 64 + 16 = 80
    # after 16 components the ratio is exactly 0.8: strict ">" must not accept it
    assert energy_rank(values, 0.8, 16, 64, 64, "squared", dense_if_no_saving=False) == 32
    assert energy_rank(values, 0.79, 16, 64, 64, "squared", dense_if_no_saving=False) == 16
    # linear energy weights singular values (sqrt): 16*2 / (16*2 + 16*1) = 0.667
    assert energy_rank(values, 0.7, 16, 64, 64, "linear", dense_if_no_saving=False) == 32
    assert energy_rank(values, 0.6, 16, 64, 64, "linear", dense_if_no_saving=False) == 16
    assert energy_rank(values, 0.6, 8, 64, 64, "linear", dense_if_no_saving=False) == 16


def test_linear_energy_keeps_more_components_than_squared():
    values = torch.linspace(1, 0.001, 256) ** 4
    sq = energy_rank(values, 0.95, 16, 256, 256, "squared", dense_if_no_saving=False)
    lin = energy_rank(values, 0.95, 16, 256, 256, "linear", dense_if_no_saving=False)
    assert sq < lin


def test_dense_when_no_saving_with_nonstrict_bound():
    values = torch.ones(64)
    # k = 32 on a 64x64 layer: k (d_in + d_out) = d_in d_out, no saving -> dense
    assert energy_rank(values, 0.49, 16, 64, 64, "squared") is None
    assert energy_rank(values, 0.2, 16, 64, 64, "squared") == 16
    # MLP shape 64 -> 256: bound 64*256/320 = 51.2
    assert energy_rank(torch.ones(256), 0.18, 16, 64, 256, "squared") == 48
    assert energy_rank(torch.ones(256), 0.19, 16, 64, 256, "squared") is None


def test_edge_bug_no_multiple_passes_stays_dense_never_larger():
    """LiteASR fell through to d_out - 1 components when no multiple of 16 below d_out passed (docs/lowrank.md)."""
    values = torch.ones(64)  # flat spectrum: 48/64 = 0.75 is the best ratio below d_out
    for dense_rule in (True, False):
        assert energy_rank(values, 0.9, 16, 64, 64, "squared", dense_if_no_saving=dense_rule) is None
    assert energy_rank(values, 0.9999, 16, 384, 64, "linear") is None


def test_theta_one_takes_every_component_and_fixed_rank():
    values = torch.rand(64)
    assert energy_rank(values, 1.0, 16, 64, 64, "squared", dense_if_no_saving=False) == 64
    assert energy_rank(values, 1.0, 16, 64, 64, "squared") is None  # not smaller than dense
    assert fixed_rank(16, 64, 64) == 16
    assert fixed_rank(32, 64, 64) is None
    assert fixed_rank(100, 64, 64, dense_if_no_saving=False) == 64


def test_pca_factors_full_rank_exact_and_bias_correction():
    torch.manual_seed(0)
    w, b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    x = torch.randn(500, 8, dtype=torch.float64)
    y = x @ w.T + b
    mean, cov = y.mean(0), torch.cov(y.T, correction=0)
    first, second, bias = pca_factors(w, b, mean, cov, 12)
    assert first.shape == (12, 8) and second.shape == (12, 12)
    torch.testing.assert_close(x @ first.T @ second.T + bias, y)
    # outputs live in an 8-dim subspace: 8 components already reproduce them exactly
    first, second, bias = pca_factors(w, b, mean, cov, 8)
    torch.testing.assert_close(x @ first.T @ second.T + bias, y)
    v = pca_basis(cov)[1][:, :4]
    _, _, bias4 = pca_factors(w, b, mean, cov, 4)
    torch.testing.assert_close(bias4, mean + v @ v.T @ (b - mean))
    # a linear without bias gains one: mu - V V^T mu
    _, _, kb = pca_factors(w, None, mean, cov, 4)
    torch.testing.assert_close(kb, mean - v @ v.T @ mean)


@pytest.mark.parametrize("k_q,k_k", [(8, 16), (16, 8), (12, 12)])
def test_reduced_scores_equal_full_scores_after_softmax(k_q, k_k):
    torch.manual_seed(0)
    heads, head_dim, batch, length = 4, 16, 2, 10
    d = heads * head_dim
    x = torch.randn(batch, length, d, dtype=torch.float64)
    aq, ak = torch.randn(k_q, d, dtype=torch.float64), torch.randn(k_k, d, dtype=torch.float64)
    bq, bk = torch.randn(d, k_q, dtype=torch.float64), torch.randn(d, k_k, dtype=torch.float64)
    cq, ck = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    q = (x @ aq.T @ bq.T + cq).view(batch, length, heads, head_dim).transpose(1, 2)
    k = (x @ ak.T @ bk.T + ck).view(batch, length, heads, head_dim).transpose(1, 2)
    full = torch.softmax(q @ k.transpose(-1, -2), -1)
    query, key = reduced_scores_operands(x @ aq.T, x @ ak.T, bq, cq, bk, ck, heads)
    assert query.shape[-1] == min(k_q, k_k) + (k_k > k_q)
    torch.testing.assert_close(torch.softmax(query @ key.transpose(-1, -2), -1), full)


def test_flop_chooser():
    # encoder of tiny: L = 1500, 6 heads of 64; rank 16 everywhere is far cheaper in rank space
    assert choose_attention_path(1500, 6, 64, 16, 16, 16) == (True, True)
    # ranks above the head dim: full path
    assert choose_attention_path(1500, 6, 64, 128, 128, 128) == (False, False)
    assert choose_attention_path(1500, 6, 64, None, 16, 16) == (False, True)
    f = attention_flops(1500, 6, 64, 32, 32, 32)
    assert f["scores_reduced"] < f["scores_full"] and f["values_reduced"] < f["values_full"]


def test_config_validation_presets_and_roundtrip():
    default = LowRankConfig()
    assert (default.preset, default.energy, default.theta_attn, default.theta_mlp) == ("a", "squared", 0.999, 0.999)
    sq = LowRankConfig(preset="b", energy="squared")
    assert (sq.theta_attn, sq.theta_mlp) == (0.99, 0.999)
    assert LowRankConfig(theta_attn=0.9).theta_mlp == 0.9
    for cfg in (LowRankConfig(preset="c"), LowRankConfig(theta_attn=0.9, theta_mlp=0.95), LowRankConfig(rank=32)):
        assert LowRankConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_theta("0.99:0.999") == (0.99, 0.999) and parse_theta("0.9") == (0.9, 0.9)
    for bad in ({"preset": "z"}, {"theta_attn": 1.5}, {"granule": 12}, {"energy": "cubic"}, {"rank": 0},
                {"preset": "a", "rank": 16}, {"targets": ("fc3",)}):
        with pytest.raises(SlimWhisperError):
            LowRankConfig(**bad)
    with pytest.raises(SlimWhisperError):
        parse_theta("a:b")
    with pytest.raises(ConfigVersionError):
        LowRankConfig(version=99)
    with pytest.raises(ConfigVersionError):
        LowRankConfig.from_dict({"nope": 1})


def test_auto_attention_plan_keeps_one_head_dim_for_the_fused_kernel():
    """Reduced scores of rank 48 with full 64-dim values would force SDPA's unfused path: dropped."""
    assert keep_fused_kernel((True, False), 64, 128, 48, None) == (False, False)
    assert keep_fused_kernel((True, True), 64, 16, 16, 16) == (True, True)  # all 16: fused
    assert keep_fused_kernel((True, True), 64, 32, 16, 24) == (False, False)
    assert keep_fused_kernel((False, True), 64, None, None, 64) == (False, True)
    assert keep_fused_kernel((True, True), 64, 16, 40, 17) == (True, True)  # query space: 16 + 1 bias dim
