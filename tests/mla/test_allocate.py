"""mla/allocate.py and greedy allocation in convert: budget met, known optimum, beats uniform, round trip."""
from __future__ import annotations

import itertools

import pytest
import torch

import slimwhisper as sw
from conftest import calib_audio, logits, tiny_whisper
from slimwhisper.calibration import feature_batches
from slimwhisper.errors import SlimWhisperError
from slimwhisper.info import describe
from slimwhisper.memory import kv_cache_bytes
from slimwhisper.mla.allocate import greedy_widths, tail_error, total_error
from slimwhisper.mla.convert import (
    GRANULE,
    cache_budget,
    calibrate_mla,
    find_targets,
    weighted_spectra,
)

FLAT = torch.ones(64)
STEEP = torch.tensor([0.5**i for i in range(64)])


def _spent(widths, unit):
    return sum(widths[n] * unit[n] for n in widths)


def _assert_budget_met(widths, spectra, unit, budget, granule):
    assert _spent(widths, unit) <= budget
    for n in widths:  # one more granule anywhere overruns, unless that module is already full
        if widths[n] < len(spectra[n]):
            assert _spent(widths, unit) + min(granule, len(spectra[n]) - widths[n]) * unit[n] > budget


def test_tail_error_is_the_relative_energy_left():
    err = tail_error(torch.tensor([2.0, 1.0, 1.0]))
    assert torch.allclose(err, torch.tensor([1.0, 2 / 6, 1 / 6, 0.0], dtype=torch.float64))


def test_flat_spectrum_gets_more_width_than_a_fast_decaying_one():
    spectra, unit = {"flat": FLAT, "steep": STEEP}, {"flat": 1, "steep": 1}
    widths = greedy_widths(spectra, unit, budget=64, granule=8)
    assert widths == {"flat": 56, "steep": 8}


@pytest.mark.parametrize("budget", [250, 333, 1000, 2500])
def test_budget_is_met_and_no_granule_fits_anymore(budget):
    gen = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": torch.rand(48, generator=gen).sort(descending=True).values ** (i + 1) for i in range(4)}
    unit = {"m0": 3, "m1": 10, "m2": 3, "m3": 10}
    widths = greedy_widths(spectra, unit, budget, granule=8)
    assert all(w % 8 == 0 and 8 <= w <= 48 for w in widths.values())
    _assert_budget_met(widths, spectra, unit, budget, 8)


def test_greedy_is_the_exhaustive_optimum_on_small_problems():
    gen = torch.Generator().manual_seed(1)
    spectra = {f"m{i}": torch.rand(32, generator=gen).sort(descending=True).values ** (2 * i + 1) for i in range(3)}
    unit = {n: 1 for n in spectra}  # equal prices: the sorted-gains greedy is exactly optimal
    budget = 56
    widths = greedy_widths(spectra, unit, budget, granule=8)
    best = min(
        total_error(spectra, dict(zip(spectra, ws)))
        for ws in itertools.product(range(8, 33, 8), repeat=3)
        if sum(ws) <= budget
    )
    assert total_error(spectra, widths) == pytest.approx(best)


def test_weights_move_width_to_the_sensitive_module():
    spectra, unit = {"a": FLAT, "b": FLAT}, {"a": 1, "b": 1}
    widths = greedy_widths(spectra, unit, budget=64, granule=8, weights={"a": 10.0, "b": 1.0})
    assert widths == {"a": 56, "b": 8}


def test_greedy_model_needs_audio_not_statistics(model_and_stats):
    model, stats = model_and_stats
    with pytest.raises(SlimWhisperError, match="calibration audio"):
        sw.convert(model, sw.MLAConfig(modules=MODULES, kv_reduction=0.75, allocation="greedy"), calibration=stats)


def test_too_small_a_budget_is_refused():
    with pytest.raises(SlimWhisperError, match="lower --kv-reduction"):
        greedy_widths({"a": FLAT, "b": FLAT}, {"a": 1, "b": 1}, budget=15, granule=8)


def test_greedy_needs_a_budget_and_the_joint_spectrum():
    with pytest.raises(SlimWhisperError, match="kv_reduction"):
        sw.MLAConfig(allocation="greedy", latent_dim=32)
    with pytest.raises(SlimWhisperError, match="joint"):
        sw.MLAConfig(allocation="greedy", kv_reduction=0.75, factorization="split")
    with pytest.raises(SlimWhisperError, match="choose from"):
        sw.MLAConfig(allocation="best")


def test_a_version_1_recipe_without_allocation_reads_as_uniform():
    data = sw.MLAConfig(kv_reduction=0.75).to_dict()
    data.pop("allocation")
    old = sw.MLAConfig.from_dict({**data, "version": 1})
    assert old.allocation == "uniform"


MODULES = ("decoder_self", "decoder_cross")


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_whisper(d_model=64, heads=4, layers=2)
    stats = calibrate_mla(model, MODULES, calib_audio(), progress=False)
    return model, stats


def test_uniform_widths_are_unchanged(model_and_stats):
    model, stats = model_and_stats
    slim = sw.convert(model, sw.MLAConfig(modules=MODULES, kv_reduction=0.75), calibration=stats)
    layers = slim.config.compression["mla"]["layers"]
    assert {g["latent_dim"] for g in layers.values()} == {32}  # (1 - 0.75) * 2 * 64, as before
    assert slim.config.compression["mla"]["recipe"]["allocation"] == "uniform"


def test_greedy_meets_the_utterance_budget_and_loses_less_than_uniform(model_and_stats):
    model, stats = model_and_stats
    config = sw.MLAConfig(modules=MODULES, kv_reduction=0.75, allocation="greedy")
    targets = find_targets(model, MODULES)
    budget, unit = cache_budget(targets, config, model.config)
    uniform_bytes = sum(32 * u for u in unit.values())
    assert uniform_bytes - GRANULE * min(unit.values()) < budget <= uniform_bytes  # same total as uniform
    kept = {n: torch.zeros(4, 0, dtype=torch.long) for n in targets}
    batches = list(feature_batches(calib_audio(), model.config.num_mel_bins))
    spectra, weights = weighted_spectra(model, targets, kept, config, stats, batches)
    assert all(w > 0 for w in weights.values())
    widths = greedy_widths(spectra, unit, budget, GRANULE, weights=weights)
    assert len(set(widths.values())) > 1  # it did choose per module
    _assert_budget_met(widths, spectra, unit, budget, GRANULE)
    uniform = {n: 32 for n in targets}
    assert total_error(spectra, widths, weights) <= total_error(spectra, uniform, weights)


def test_greedy_model_saves_and_reloads_strictly(model_and_stats, features, tmp_path):
    model, stats = model_and_stats
    slim = sw.convert(model, sw.MLAConfig(modules=MODULES, kv_reduction=0.75, allocation="greedy"),
                      calibration=calib_audio(), progress=False)
    widths = {n: g["latent_dim"] for n, g in slim.config.compression["mla"]["layers"].items()}
    slim.save_pretrained(tmp_path)
    back, info = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched weights
    back.eval()
    assert {n: g["latent_dim"] for n, g in back.config.compression["mla"]["layers"].items()} == widths
    assert torch.equal(logits(slim, features), logits(back, features))
    shown = describe(back.config)["mla"]["geometry"]
    assert {n: g["latent_dim"] for n, g in shown.items()} == widths


@pytest.mark.parametrize("kept", [0, 4])
def test_converted_cache_of_one_utterance_fits_the_budget(model_and_stats, kept):
    model, stats = model_and_stats
    slim = sw.convert(model, sw.MLAConfig(modules=MODULES, kv_reduction=0.75, kept_dims=kept, allocation="greedy"),
                      calibration=calib_audio(), progress=False)
    tokens = model.config.max_target_positions
    before, after = kv_cache_bytes(model, tokens=tokens).total, kv_cache_bytes(slim, tokens=tokens).total
    assert 0.25 * before - GRANULE * 1500 * 2 < after <= 0.25 * before
