"""lowrank/convert.py: exact at theta 1, smaller when compressed, composes with MLA."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from conftest import logits
from slimwhisper.errors import SlimWhisperError
from slimwhisper.info import describe
from slimwhisper.lowrank import LowRankConfig, LowRankLinear

EXACT = LowRankConfig(theta_attn=1.0, theta_mlp=1.0, granule=8, dense_if_no_saving=False)


def test_theta_one_reproduces_logits(tiny_model, features, encoder_stats):
    slim = sw.convert(tiny_model, EXACT, calibration=encoder_stats)
    assert isinstance(slim, sw.SlimWhisperForConditionalGeneration)
    assert sum(isinstance(m, LowRankLinear) for m in slim.modules()) == 12
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() <= 1e-4
    k_proj = slim.model.encoder.layers[0].self_attn.k_proj
    # k_proj (no bias in Whisper) gains one, mu - V V^T mu, which is 0 at full rank (V V^T = I)
    assert k_proj.rank == 64 and k_proj.up.bias.shape == (64,)
    torch.testing.assert_close(k_proj.up.bias, torch.zeros(64), atol=1e-4, rtol=0)


def test_compression_shrinks_encoder_and_changes_outputs(tiny_model, features, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(theta_attn=0.5, theta_mlp=0.5, granule=8), calibration=encoder_stats)
    layers = slim.config.compression["lowrank"]["layers"]
    assert layers and all(k % 8 == 0 for k in layers.values())
    # the recorded ranks are the modules' ranks, and the factors have those shapes
    built = {name: m for name, m in slim.named_modules() if isinstance(m, LowRankLinear)}
    assert {name: m.rank for name, m in built.items()} == layers
    assert all(m.down.weight.shape == (m.rank, m.in_features) for m in built.values())
    info = describe(slim.config)

    def encoder_params(model):
        return sum(p.numel() for p in model.model.encoder.parameters())

    assert info["encoder_params"] == {"original": encoder_params(tiny_model), "compressed": encoder_params(slim)}
    assert info["encoder_params"]["compressed"] < info["encoder_params"]["original"]
    assert info["lowrank"]["ranks"] == layers
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() > 1e-3
    # the original is untouched
    assert isinstance(tiny_model.model.encoder.layers[0].fc1, torch.nn.Linear)


@pytest.mark.parametrize("order", ["mla_first", "lowrank_first"])
def test_composes_with_mla(tiny_model, features, encoder_stats, tmp_path, order):
    mla_cfg = sw.MLAConfig(modules=("decoder_self",), kv_reduction=0.5, factorization="joint")
    lr_cfg = LowRankConfig(rank=8, granule=8)
    if order == "mla_first":
        both = sw.convert(sw.convert(tiny_model, mla_cfg), lr_cfg, calibration=encoder_stats)
    else:
        both = sw.convert(sw.convert(tiny_model, lr_cfg, calibration=encoder_stats), mla_cfg)
    assert {"mla", "lowrank"} <= set(both.config.compression)
    assert any(isinstance(m, sw.WhisperMLAAttention) for m in both.modules())
    assert any(isinstance(m, LowRankLinear) for m in both.modules())
    both.save_pretrained(tmp_path / "both")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "both")
    torch.testing.assert_close(logits(again, features), logits(both, features))
    with pytest.raises(SlimWhisperError):
        sw.convert(both, lr_cfg, calibration=encoder_stats)
    with pytest.raises(SlimWhisperError):
        sw.convert(both, mla_cfg)
