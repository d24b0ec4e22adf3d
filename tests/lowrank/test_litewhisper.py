"""lowrank/litewhisper.py: the lite-whisper format round trip."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import slimwhisper as sw
from conftest import logits
from slimwhisper.errors import SlimWhisperError
from slimwhisper.lowrank import LowRankConfig, load_lite_whisper, save_lite_whisper


def test_lite_whisper_round_trip(tiny_model, features, encoder_stats, tmp_path):
    slim = sw.convert(tiny_model, LowRankConfig(theta_attn=0.6, theta_mlp=0.6, granule=8), calibration=encoder_stats)
    save_lite_whisper(slim, tmp_path / "lite")
    encoder_layers = slim.config.compression["lowrank"]["layers"]
    cfg = json.loads((tmp_path / "lite" / "config.json").read_text())
    assert cfg["model_type"] == "lite-whisper"
    # one dict per encoder layer, naming each compressed linear by its last name part ("fc1", "q_proj")
    per_layer = [{}, {}]
    for name, rank in encoder_layers.items():  # "model.encoder.layers.<i>.<block>.<linear>"
        per_layer[int(name.split(".")[3])][name.rsplit(".", 1)[1]] = rank
    assert cfg["low_rank_config"] == per_layer and any(per_layer)
    tensors = load_file(str(tmp_path / "lite" / "model.safetensors"))
    name, rank = next(iter(slim.config.compression["lowrank"]["layers"].items()))
    assert tensors[f"{name}.weight1"].shape[1] == rank  # [in, k]
    assert tensors[f"{name}.weight2"].shape[0] == rank  # [k, out]
    assert f"{name}.bias" in tensors and "proj_out.weight" not in tensors
    back = load_lite_whisper(tmp_path / "lite")
    assert back.config.compression["lowrank"]["layers"] == slim.config.compression["lowrank"]["layers"]
    torch.testing.assert_close(logits(back, features), logits(slim, features))
    save_lite_whisper(back, tmp_path / "lite2")
    again = load_file(str(tmp_path / "lite2" / "model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    mla = sw.convert(slim, sw.MLAConfig(kv_reduction=0.5, factorization="joint"))
    with pytest.raises(SlimWhisperError):
        save_lite_whisper(mla, tmp_path / "nope")
