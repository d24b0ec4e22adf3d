"""lowrank/heads.py and its math: narrowed heads keep scores and head outputs best, exact at full width, reload."""
from __future__ import annotations

import copy

import pytest
import torch

import slimwhisper as sw
from conftest import calib_audio, logits
from slimwhisper.cli import _lowrank_line
from slimwhisper.errors import SlimWhisperError
from slimwhisper.info import describe
from slimwhisper.lowrank import LowRankConfig, LowRankLinear, WhisperLowRankAttention
from slimwhisper.lowrank.config import TARGETS
from slimwhisper.lowrank.heads import layer_moments, linear_cost, narrowed_attention
from slimwhisper.lowrank.math import greedy_head_dims, head_dim_options, score_maps, value_maps


def _samples(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated, uncentred rows: real heads are neither white nor zero-mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + 0.3


def test_score_maps_lose_exactly_the_dropped_singular_values_and_beat_plain_truncation():
    q, k = _samples(400, 16, 0), _samples(300, 16, 1)
    m_q, m_k = q.T @ q / len(q), k.T @ k / len(k)
    a_q, a_k = score_maps(m_q, m_k, 16)
    torch.testing.assert_close((q @ a_q.T) @ (k @ a_k.T).T, q @ k.T)
    a_q, a_k = score_maps(m_q, m_k, 6)
    assert a_q.shape == a_k.shape == (6, 16)
    error = ((q @ a_q.T) @ (k @ a_k.T).T - q @ k.T).pow(2).mean()
    # over every (query, key) pair the mean squared score error is the whitened form's dropped energy
    s = torch.linalg.svdvals(torch.linalg.cholesky(m_q).T @ torch.linalg.cholesky(m_k))
    assert float(error) == pytest.approx(float(s[6:].pow(2).sum()), rel=1e-6)
    kept = (q[:, :6] @ k[:, :6].T - q @ k.T).pow(2).mean()  # keeping 6 of the head's own coordinates
    assert error < 0.5 * kept


def test_value_maps_lose_exactly_the_dropped_singular_values():
    v, w = _samples(500, 16, 2), torch.randn(24, 16, dtype=torch.float64)
    moment = v.T @ v / len(v)
    a_v, b_o = value_maps(w, moment, 16)
    torch.testing.assert_close(v @ a_v.T @ b_o.T, v @ w.T)
    a_v, b_o = value_maps(w, moment, 5)
    assert a_v.shape == (5, 16) and b_o.shape == (24, 5)
    error = (v @ a_v.T @ b_o.T - v @ w.T).pow(2).sum(1).mean()
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(moment))
    assert float(error) == pytest.approx(float(s[5:].pow(2).sum()), rel=1e-6)


def test_head_dim_options_stop_at_half_the_head():
    assert head_dim_options(64, 16) == [48, 32]
    assert head_dim_options(64, 8) == [56, 48, 40, 32]
    assert head_dim_options(16, 8) == [8]
    assert head_dim_options(20, 8) == []


def test_greedy_head_dims_narrow_where_error_grows_least_per_dimension_until_the_budget_fits():
    errors = {0: {48: 0.08, 32: 0.30}, 1: {48: 0.001, 32: 0.007}, 2: {48: 0.002, 32: 0.009}}
    assert greedy_head_dims(errors, 64, 0.95) == {1: 48}
    assert greedy_head_dims(errors, 64, 0.7) == {1: 32, 2: 32}
    # the budget cannot be met: every layer at its narrowest option, then stop
    assert greedy_head_dims(errors, 64, 0.1) == {0: 32, 1: 32, 2: 32}
    assert greedy_head_dims({0: {}}, 64, 0.5) == {}


@pytest.fixture
def lowrank(tiny_model, encoder_stats):
    """tiny_model with every encoder linear a PCA pair (ranks 8: q, k, v, out stay pairs after narrowing)."""
    return sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats).eval()


def _dense(attn):
    """A copy of `attn` whose pairs are multiplied out into dense linears of the same map."""
    out = copy.deepcopy(attn)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        module = getattr(out, name)
        if isinstance(module, LowRankLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features)
            with torch.no_grad():
                dense.weight.copy_(module.up.weight @ module.down.weight)
                dense.bias.copy_(module.up.bias)
            setattr(out, name, dense)
    return out


def test_narrowing_to_the_full_head_changes_nothing_and_a_pair_that_stops_saving_is_folded(lowrank, encoder_stats):
    attn = lowrank.model.encoder.layers[0].self_attn
    moments = layer_moments(encoder_stats, "model.encoder.layers.0.self_attn", attn.num_heads)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        reference = attn(x)[0]
        same = narrowed_attention(attn, attn.head_dim, moments)
        assert same.head_dim == 16 and same.scaling == attn.scaling
        torch.testing.assert_close(same(x)[0], reference, atol=1e-4, rtol=1e-4)
        narrow = narrowed_attention(attn, 8, moments)
        # 64 -> 8 -> 32 costs 768 multiplies against 2048 dense: still a pair; 8 x (64 + 32) vs 64 x 32
        assert narrow.head_dim == 8 and isinstance(narrow.q_proj, LowRankLinear) and narrow.q_proj.out_features == 32
        assert narrow.out_proj.in_features == 32
        # the narrowed maps act on the last linear of each projection: folding pairs first gives the same module
        folded = narrowed_attention(_dense(attn), 8, moments)
        assert isinstance(folded.q_proj, torch.nn.Linear) and folded.k_proj.bias is None
        torch.testing.assert_close(folded(x)[0], narrow(x)[0], atol=1e-4, rtol=1e-4)
        assert (narrow(x)[0] - reference).norm() > 1e-3 * reference.norm()  # narrowed: no longer exact
    assert linear_cost(narrow.q_proj) == 8 * (64 + 32) and linear_cost(folded.q_proj) == 64 * 32


def test_attention_budget_narrows_heads_records_them_and_reloads_strictly(tiny_model, features, tmp_path):
    config = LowRankConfig(budget=0.6, granule=8, attention_budget=0.5)
    slim = sw.convert(tiny_model, config, calibration=calib_audio(), progress=False)
    spec = slim.config.compression["lowrank"]
    assert spec["head_dims"] == {f"model.encoder.layers.{i}.self_attn": 8 for i in range(2)}
    assert spec["attention_flops_kept"] == 0.5
    attention = [layer.self_attn for layer in slim.model.encoder.layers]
    assert all(isinstance(a, WhisperLowRankAttention) and a.head_dim == 8 for a in attention)
    built = {n: m.rank for n, m in slim.named_modules() if isinstance(m, LowRankLinear)}
    assert built == spec["layers"]
    linears = [f"model.encoder.layers.{i}.{target}" for i in range(2) for target in TARGETS]
    dense = sum(m.in_features * m.out_features for n, m in tiny_model.named_modules() if n in linears)
    assert spec["linear_flops_kept"] == pytest.approx(sum(linear_cost(slim.get_submodule(n)) for n in linears) / dense,
                                                      abs=1e-6)
    info = describe(slim.config)
    assert info["lowrank"]["head_dims"] == spec["head_dims"] and info["lowrank"]["attention_flops_kept"] == 0.5
    assert "head dims by layer 0: 8, 1: 8, 0.500 of the attention FLOPs" in _lowrank_line(info)
    slim.save_pretrained(tmp_path / "m")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(again, features), logits(slim, features))
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() > 1e-3


def test_attention_budget_settings_are_checked():
    with pytest.raises(SlimWhisperError, match="in \\(0, 1\\)"):
        LowRankConfig(budget=0.6, attention_budget=1.0)
    with pytest.raises(SlimWhisperError, match="self_attn.k_proj"):
        LowRankConfig(budget=0.6, attention_budget=0.7, targets=("self_attn.q_proj", "fc1"))
    assert LowRankConfig.from_dict(LowRankConfig(budget=0.6, attention_budget=0.7).to_dict()).attention_budget == 0.7
