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


def test_joint_down_projections_equal_the_hf_path(tiny_model, encoder_stats):
    """At ranks where the rank space does not pay, the module still runs its own path: the `down` halves of
    q, k and v as one product. It equals HF's attention in float and, under int8, the separate int8 calls."""
    from slimwhisper.engine.quantize import quantize_dynamic_int8

    slim = sw.convert(tiny_model, LowRankConfig(rank=24, granule=8), calibration=encoder_stats)
    attn = slim.model.encoder.layers[0].self_attn
    assert attn.reduced_plan(50) == (False, False) and len(attn.low_rank_inputs()) == 3
    calls = []
    attn.q_proj.register_forward_hook(lambda *a: calls.append("q"))  # the whole q_proj never runs
    x = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = attn(x)[0]
        assert not calls
        attn.attention_path = "standard"
        ref = attn(x)[0]
        assert calls
    torch.testing.assert_close(own, ref, atol=1e-5, rtol=1e-4)
    q = quantize_dynamic_int8(slim).model.encoder.layers[0].self_attn
    low = q.downs(x)
    assert q._int8_down[1] is not None  # the int8 rows were stacked into one call
    for name, out in low.items():
        assert torch.equal(out, getattr(q, name).down(x))
