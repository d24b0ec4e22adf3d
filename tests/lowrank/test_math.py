"""Pure functions of the low-rank encoder: rank choice (incl. LiteASR's edge bug), PCA factors, attention kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
    # the smallest multiple of 16 whose energy share passes 0.95, counted independently in numpy
    for weights, rank in ((values.double().numpy(), sq), (values.double().sqrt().numpy(), lin)):
        share = np.cumsum(weights) / weights.sum()
        assert rank == next(j for j in range(16, 256, 16) if share[j - 1] > 0.95)
    assert (sq, lin) == (128, 176)


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
    L, H, d, k = 1500, 6, 6 * 64, 32  # noqa: N806  (the paper's symbols)
    assert f == {
        "scores_full": 2 * L * d * (k + k) + 2 * L * L * d,  # up-project q and k, then L^2 d
        "scores_reduced": 2 * H * L * k * k + 2 * H * L * L * k,  # one [k, k] matrix per head, scores in k dims
        "values_full": 2 * L * d * k + 2 * L * L * d,
        "values_reduced": 2 * H * L * L * k + 2 * L * k * d,
    }
    assert f["scores_reduced"] < f["scores_full"] and f["values_reduced"] < f["values_full"]


def test_auto_attention_plan_keeps_one_head_dim_for_the_fused_kernel():
    """Reduced scores of rank 48 with full 64-dim values would force SDPA's unfused path: dropped."""
    assert keep_fused_kernel((True, False), 64, 128, 48, None) == (False, False)
    assert keep_fused_kernel((True, True), 64, 16, 16, 16) == (True, True)  # all 16: fused
    assert keep_fused_kernel((True, True), 64, 32, 16, 24) == (False, False)
    assert keep_fused_kernel((False, True), 64, None, None, 64) == (False, True)
    assert keep_fused_kernel((True, True), 64, 16, 40, 17) == (True, True)  # query space: 16 + 1 bias dim


def _spectrum(decay: float, d: int = 64) -> torch.Tensor:
    return torch.tensor([decay**i for i in range(d)], dtype=torch.float64)


def test_budget_ranks_meet_the_budget_and_favour_the_compressible_linear():
    from slimwhisper.lowrank.math import budget_ranks, flops_kept

    # "flat" spreads its variance over all 64 directions, "steep" holds it in a few: at one budget the
    # allocation cuts "steep" deeper than "flat"
    spectra = {"flat": (_spectrum(0.99, 128), 128, 128), "steep": (_spectrum(0.5, 128), 128, 128)}
    shapes = {n: (d_in, d_out) for n, (_, d_in, d_out) in spectra.items()}
    for budget in (0.8, 0.5, 0.3):
        ranks = budget_ranks(spectra, budget, granule=8)
        assert flops_kept(ranks, shapes) <= budget + 1e-9
        assert ranks["steep"] is not None and (ranks["flat"] is None or ranks["steep"] < ranks["flat"])
    # a budget no rank can meet ends with every linear at its smallest rank
    assert budget_ranks(spectra, 0.01, granule=8) == {"flat": 8, "steep": 8}
    assert budget_ranks(spectra, 0.999, granule=8) == {"flat": None, "steep": 56}  # one step: the cheapest one


def test_budget_ranks_follow_the_measured_errors():
    from slimwhisper.lowrank.math import budget_ranks

    spectra = {"a": (_spectrum(0.9), 64, 64), "b": (_spectrum(0.9), 64, 64)}
    even = budget_ranks(spectra, 0.5, granule=8)
    assert even["a"] == even["b"]
    # the same spectra, but an error in "b" costs the output 100 times more: "b" keeps more rank
    errors = {"a": {8: 0.01, 16: 0.005, 24: 0.002}, "b": {8: 1.0, 16: 0.5, 24: 0.2}}
    skewed = budget_ranks(spectra, 0.5, granule=8, errors=errors)
    assert skewed["b"] is None or skewed["b"] > skewed["a"]


def test_predicted_error_meets_every_measure_and_falls_to_zero_at_full_rank():
    from slimwhisper.lowrank.math import lost_energy, predicted_error, probe_ranks, rank_options

    values = _spectrum(0.9, 128)
    measured = {8: 0.4, 32: 0.1, 56: 0.02}
    assert [predicted_error(values, measured, k) for k in measured] == pytest.approx(list(measured.values()))
    assert predicted_error(values, measured, 128) == 0.0
    between = predicted_error(values, measured, 16)
    assert 0.1 < between < 0.4
    # linear in lost energy between the two measures
    share = (lost_energy(values, 8) - lost_energy(values, 16)) / (lost_energy(values, 8) - lost_energy(values, 32))
    assert between == pytest.approx(0.4 + share * (0.1 - 0.4))
    assert probe_ranks(128, 128, 8) == [8, 24, 32, 40, 56] and probe_ranks(64, 64, 8) == rank_options(64, 64, 8)
    assert probe_ranks(8, 8, 8) == []


def test_role_costs_count_each_rank_and_dense_last():
    from slimwhisper.lowrank.math import role_costs, role_options

    # a 64x64 pair saves below rank 32, a 64x256 one below 51.2: rank 40 saves on the second only
    shapes = [(64, 64), (64, 256)]
    assert role_options(shapes, granule=8) == [8, 16, 24, 32, 40, 48, None]
    costs = role_costs(shapes, role_options(shapes, granule=8))
    assert len(costs) == 6 + 1  # ranks 8..48, then dense
    assert costs[0] == 8 * 128 + 8 * 320
    assert costs[4] == 64 * 64 + 40 * 320  # the square linear stays dense at rank 40
    assert costs[-1] == 64 * 64 + 64 * 256


def test_fitting_combinations_fit_and_cannot_grow():
    from slimwhisper.lowrank.math import fitting_combinations

    costs = {"a": [1, 2, 3, 4], "b": [2, 4, 6, 8]}
    allowed = {r: list(range(len(c))) for r, c in costs.items()}
    found = fitting_combinations(costs, 7, allowed)
    assert found and all(costs["a"][c["a"]] + costs["b"][c["b"]] <= 7 for c in found)
    for c in found:  # no role can take its next option
        assert c["a"] == 3 or costs["a"][c["a"] + 1] + costs["b"][c["b"]] > 7
        assert c["b"] == 3 or costs["a"][c["a"]] + costs["b"][c["b"] + 1] > 7
    assert {(c["a"], c["b"]) for c in found} == {(0, 2), (2, 1), (3, 0)}
    assert fitting_combinations(costs, 2, allowed) == []


def test_search_roles_finds_the_best_fitting_combination_without_repeats():
    from slimwhisper.lowrank.math import fitting_combinations, search_roles

    # three roles of 12, 12 and 20 options (tiny.en's at granule 16), costs growing with the rank
    costs = {"s": [2 * 768 * 16 * (p + 1) for p in range(11)] + [2 * 147456],
             "v": [2 * 768 * 16 * (p + 1) for p in range(11)] + [2 * 147456],
             "m": [2 * 1920 * 16 * (p + 1) for p in range(19)] + [2 * 589824]}
    limit = 0.6 * sum(c[-1] for c in costs.values())

    def error(p):  # smooth, with a different weight per role, so the best split is not the even one
        return 3.0 / (p["s"] + 1) + 0.5 / (p["v"] + 1) + 9.0 / (p["m"] + 1)

    calls = []
    best = search_roles(costs, limit, lambda p: calls.append(tuple(p.items())) or error(p))
    every = fitting_combinations(costs, limit, {r: list(range(len(c))) for r, c in costs.items()})
    assert error(best) == pytest.approx(min(error(c) for c in every))
    assert len(calls) == len(set(calls)) < len(every) / 2  # coarse to fine: far fewer than all of them
    assert sum(costs[r][p] for r, p in best.items()) <= limit
    # nothing fits: every role at its smallest rank, nothing evaluated
    assert search_roles(costs, 1, lambda p: 1 / 0) == {"s": 0, "v": 0, "m": 0}
