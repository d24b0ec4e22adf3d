"""Low-rank encoder on tiny random Whisper models: exactness, reduced attention, save/load, composition, formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import slimwhisper as sw
from slimwhisper.errors import SlimWhisperError
from slimwhisper.info import describe
from slimwhisper.lowrank import (
    STATS_FILE,
    EncoderStats,
    LowRankConfig,
    LowRankLinear,
    WhisperLowRankAttention,
    calibrate,
    load_lite_whisper,
    save_lite_whisper,
)

PROMPT = torch.tensor([[91, 93, 5, 6, 7, 8], [91, 93, 9, 3, 2, 1]])
EXACT = LowRankConfig(theta_attn=1.0, theta_mlp=1.0, granule=8, dense_if_no_saving=False)


def calib_audio(n: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(16000 * 2).astype(np.float32) * 0.1 for i in range(n)]


def logits(model, features):
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=PROMPT).logits


@pytest.fixture(scope="module")
def stats():
    from conftest import tiny_whisper

    return calibrate(tiny_whisper(), calib_audio(), progress=False)


def test_theta_one_reproduces_logits(tiny_model, features, stats):
    slim = sw.convert(tiny_model, EXACT, calibration=stats)
    assert isinstance(slim, sw.SlimWhisperForConditionalGeneration)
    assert sum(isinstance(m, LowRankLinear) for m in slim.modules()) == 12
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() <= 1e-4
    k_proj = slim.model.encoder.layers[0].self_attn.k_proj
    assert k_proj.up.bias is not None  # k_proj gains a bias


def test_compression_shrinks_encoder_and_changes_outputs(tiny_model, features, stats):
    slim = sw.convert(tiny_model, LowRankConfig(theta_attn=0.5, theta_mlp=0.5, granule=8), calibration=stats)
    layers = slim.config.compression["lowrank"]["layers"]
    assert layers and all(k % 8 == 0 for k in layers.values())
    info = describe(slim.config)
    assert info["encoder_params"]["compressed"] < info["encoder_params"]["original"]
    assert info["lowrank"]["ranks"] == layers
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() > 1e-3
    # the original is untouched
    assert isinstance(tiny_model.model.encoder.layers[0].fc1, torch.nn.Linear)


def test_reduced_attention_equals_two_linear_path(tiny_model, stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=stats)
    attn = slim.model.encoder.layers[0].self_attn
    assert isinstance(attn, WhisperLowRankAttention)
    assert attn.reduced_plan(1500) == (True, True)  # rank 8 < head dim 16: cheaper in rank space
    torch.manual_seed(0)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        attn.attention_path = "standard"
        ref = attn(x)[0]
        attn.attention_path = "reduced"
        red = attn(x)[0]
    torch.testing.assert_close(red, ref, atol=1e-5, rtol=1e-4)
    # mixed ranks: q above k, v dense-sized
    slim2 = sw.convert(tiny_model, EXACT, calibration=stats)
    attn2 = slim2.model.encoder.layers[1].self_attn
    with torch.no_grad():
        attn2.attention_path = "standard"
        ref = attn2(x)[0]
        attn2.attention_path = "reduced"
        red = attn2(x)[0]
    torch.testing.assert_close(red, ref, atol=1e-5, rtol=1e-4)


def test_save_reload_strict_and_corrupt(tiny_model, features, stats, tmp_path):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=stats)
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


@pytest.mark.parametrize("order", ["mla_first", "lowrank_first"])
def test_composes_with_mla(tiny_model, features, stats, tmp_path, order):
    mla_cfg = sw.MLAConfig(modules=("decoder_self",), kv_reduction=0.5, factorization="joint")
    lr_cfg = LowRankConfig(rank=8, granule=8)
    if order == "mla_first":
        both = sw.convert(sw.convert(tiny_model, mla_cfg), lr_cfg, calibration=stats)
    else:
        both = sw.convert(sw.convert(tiny_model, lr_cfg, calibration=stats), mla_cfg)
    assert {"mla", "lowrank"} <= set(both.config.compression)
    assert any(isinstance(m, sw.WhisperMLAAttention) for m in both.modules())
    assert any(isinstance(m, LowRankLinear) for m in both.modules())
    both.save_pretrained(tmp_path / "both")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "both")
    torch.testing.assert_close(logits(again, features), logits(both, features))
    with pytest.raises(SlimWhisperError):
        sw.convert(both, lr_cfg, calibration=stats)
    with pytest.raises(SlimWhisperError):
        sw.convert(both, mla_cfg)


def test_mla_on_low_rank_encoder_attention_is_refused_clearly(tiny_model, stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=stats)
    with pytest.raises(SlimWhisperError, match="low-rank"):
        sw.convert(slim, sw.MLAConfig(modules=("encoder_self",), factorization="joint"))


def test_lite_whisper_round_trip(tiny_model, features, stats, tmp_path):
    slim = sw.convert(tiny_model, LowRankConfig(theta_attn=0.6, theta_mlp=0.6, granule=8), calibration=stats)
    save_lite_whisper(slim, tmp_path / "lite")
    cfg = json.loads((tmp_path / "lite" / "config.json").read_text())
    assert cfg["model_type"] == "lite-whisper" and len(cfg["low_rank_config"]) == 2
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


def test_stats_streamed_deterministic_and_reusable(tiny_model, stats, tmp_path):
    more = calibrate(tiny_model, calib_audio(6), progress=False)
    for name, s in more.layers.items():  # accumulator shapes depend on the layer, not on the audio
        assert s.gram.shape == stats.layers[name].gram.shape == (s.total.numel(),) * 2
        assert s.gram.dtype == torch.float64
    assert more.windows == 6 and stats.windows == 3
    again = calibrate(tiny_model, calib_audio(), progress=False)
    cfg = LowRankConfig(theta_attn=0.6, theta_mlp=0.7, granule=8)
    r1 = sw.convert(tiny_model, cfg, calibration=stats).config.compression["lowrank"]["layers"]
    r2 = sw.convert(tiny_model, cfg, calibration=again).config.compression["lowrank"]["layers"]
    assert r1 == r2
    path = stats.save(tmp_path / STATS_FILE)
    loaded = EncoderStats.load(tmp_path)
    assert loaded.windows == 3 and loaded.fingerprint == stats.fingerprint
    r3 = sw.convert(tiny_model, cfg, calibration=str(path)).config.compression["lowrank"]["layers"]
    assert r3 == r1
    from conftest import tiny_whisper

    with pytest.raises(SlimWhisperError, match="another encoder"):
        sw.convert(tiny_whisper(seed=5), cfg, calibration=loaded)


def test_cli_bad_input_exit_2(capsys, tmp_path):
    from slimwhisper.cli import main

    for argv in (["--theta", "x:y"], ["--theta", "0.9", "--preset", "a"], ["--theta", "1.5"]):
        code = main(["compress-encoder", "tiny.en", *argv, "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("slimwhisper: error: "), err


@pytest.mark.real
def test_real_tiny_en_cli_compress_info_and_reload(capsys, tmp_path):
    """tiny.en, preset b on 2 bundled clips: smaller encoder, info lists ranks, reload is strict, stats reused.

    fc1 (1536 outputs) is left out only to keep the eigendecompositions, and so the test, short.
    """
    from slimwhisper.cli import main

    out = tmp_path / "tiny-lr"
    targets = ["self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.out_proj,fc2"]
    code = main(["compress-encoder", "tiny.en", "--preset", "b", "--calibration-limit", "2", "--targets", *targets,
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert (out / STATS_FILE).is_file() and (out / "model.safetensors").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder_params"]["compressed"] < info["encoder_params"]["original"]
    assert info["lowrank"]["ranks"] and all(k % 16 == 0 for k in info["lowrank"]["ranks"].values())
    model = sw.SlimWhisperForConditionalGeneration.from_pretrained(out)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    out2 = tmp_path / "tiny-lr-again"
    assert main(["compress-encoder", "tiny.en", "--preset", "b", "--stats", str(out), "--targets", *targets,
                 "--out", str(out2), "--quiet"]) == 0
    again = json.loads((out2 / "config.json").read_text())["compression"]["lowrank"]["layers"]
    assert again == info["lowrank"]["ranks"]


def test_lite_whisper_directory_loads_and_describes(tmp_path, capsys):
    """`slimwhisper.load` and `slimwhisper info` read a lite-whisper directory (its model_type is not an HF one)."""
    from test_recovery import tiny_pair

    from slimwhisper.cli import main
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    audio = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1]
    slim = sw.convert(model, LowRankConfig(rank=8, granule=8), calibration=audio, progress=False)
    save_lite_whisper(slim, tmp_path / "lite")
    save_processor(processor, tmp_path / "lite")
    loaded, _ = sw.load(tmp_path / "lite")
    assert loaded.config.compression["lowrank"]["layers"] == slim.config.compression["lowrank"]["layers"]
    features = torch.randn(1, 80, 3000)
    torch.testing.assert_close(loaded.generate(features, max_new_tokens=4), slim.generate(features, max_new_tokens=4))
    assert main(["info", str(tmp_path / "lite"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lowrank"]["ranks"] == slim.config.compression["lowrank"]["layers"]
