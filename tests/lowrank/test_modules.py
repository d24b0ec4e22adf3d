"""lowrank/modules.py: reduced (rank-space) attention equals the two-linear path."""
from __future__ import annotations

import torch

import slimwhisper as sw
from slimwhisper.lowrank import LowRankConfig, WhisperLowRankAttention

EXACT = LowRankConfig(theta_attn=1.0, theta_mlp=1.0, granule=8, dense_if_no_saving=False)


def test_reduced_attention_equals_two_linear_path(tiny_model, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
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
    slim2 = sw.convert(tiny_model, EXACT, calibration=encoder_stats)
    attn2 = slim2.model.encoder.layers[1].self_attn
    with torch.no_grad():
        attn2.attention_path = "standard"
        ref = attn2(x)[0]
        attn2.attention_path = "reduced"
        red = attn2(x)[0]
    torch.testing.assert_close(red, ref, atol=1e-5, rtol=1e-4)
