"""lowrank/modules.py: rank-space attention equals the two-linear path; the blocked MLP, the full-width one."""
from __future__ import annotations

import torch
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperEncoderLayer

import slimwhisper as sw
from slimwhisper.lowrank import (
    LowRankConfig,
    LowRankLinear,
    WhisperLowRankAttention,
    WhisperLowRankEncoderLayer,
    modules,
)

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


def test_head_dim_attention_skips_hf_copies_and_equals_the_hf_path(tiny_model, encoder_stats, monkeypatch):
    """At ranks where the rank space does not pay, "auto" still runs its own SDPA call on strided head views
    (not HF's path, which copies q, k, v and the output), and gives HF's result; with a mask it defers to HF."""
    slim = sw.convert(tiny_model, EXACT, calibration=encoder_stats).eval()
    attn = slim.model.encoder.layers[0].self_attn
    assert attn.reduced_plan(1500) == (False, False)
    torch.manual_seed(0)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        attn.attention_path = "standard"
        ref = attn(x)[0]
        attn.attention_path = "auto"
        calls = []
        hf_forward = WhisperAttention.forward
        monkeypatch.setattr(WhisperAttention, "forward", lambda *a, **k: calls.append(1) or hf_forward(*a, **k))
        lean = attn(x)[0]
        assert not calls
        masked = attn(x, attention_mask=torch.zeros(2, 1, 50, 50))[0]
        assert calls
    torch.testing.assert_close(lean, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-4)


def test_blocked_mlp_equals_the_full_width_pass_and_survives_a_reload(tiny_model, encoder_stats, monkeypatch,
                                                                       tmp_path):
    """At inference a low-rank layer's MLP runs in row blocks; with blocks of 7 rows (a remainder too) the
    layer's output equals the ordinary full-width pass, which training (gradients on) still takes."""
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats).eval()
    layer = slim.model.encoder.layers[0]
    assert isinstance(layer, WhisperLowRankEncoderLayer) and isinstance(layer.fc1, LowRankLinear)
    monkeypatch.setattr(modules, "MLP_BLOCK_BYTES", 7 * layer.fc1.out_features * 4)
    torch.manual_seed(0)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        assert layer.block_rows(x) == 7
        blocked = layer(x, None)
    reference = layer(x, None)  # gradients on: one full-width pass
    assert layer.block_rows(x) is None and reference.requires_grad
    torch.testing.assert_close(blocked, reference.detach(), atol=1e-6, rtol=1e-6)
    slim.save_pretrained(tmp_path / "m")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert all(isinstance(a, WhisperLowRankEncoderLayer) for a in again.model.encoder.layers)


def test_a_layer_with_a_dense_mlp_stays_a_whisper_encoder_layer(tiny_model, encoder_stats):
    only_attention = LowRankConfig(rank=8, granule=8, targets=("self_attn.q_proj", "self_attn.k_proj"))
    slim = sw.convert(tiny_model, only_attention, calibration=encoder_stats)
    assert all(type(layer) is WhisperEncoderLayer for layer in slim.model.encoder.layers)
