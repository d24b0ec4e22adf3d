"""mla/modules.py: absorbed, folded and materialised decoding agree; padding, generate and beams."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import slimwhisper as sw
from conftest import PROMPT, calib_audio, step_logits
from slimwhisper.mla import modules as mla_modules


@pytest.mark.parametrize("cfg", [
    sw.MLAConfig(kv_reduction=0.75),
    sw.MLAConfig(kv_reduction=0.75, kept_dims=4, selection="2norm", modules=("decoder_self", "decoder_cross")),
    sw.MLAConfig(kv_reduction=0.75, factorization="split", modules=("decoder_self", "decoder_cross")),
])
def test_absorbed_decode_equals_materialised(tiny_model, features, cfg):
    slim = sw.convert(tiny_model, cfg, calibration=calib_audio(), progress=False)
    with mock.patch.object(mla_modules, "latent_attention", wraps=mla_modules.latent_attention) as spy:
        absorbed = step_logits(slim, features)
    # the 2-token prefill is materialised; each of the 7 single-token steps reads every converted module's cache
    layers = tiny_model.config.decoder_layers
    assert spy.call_count == 7 * layers * len(cfg.modules), "decode did not take the absorbed path"
    sw.set_decode_mode(slim, "materialized")
    with mock.patch.object(mla_modules, "latent_attention", wraps=mla_modules.latent_attention) as spy:
        materialised = step_logits(slim, features)
    assert spy.call_count == 0
    torch.testing.assert_close(absorbed, materialised, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kept", [0, 2])
def test_folded_decode_equals_unfolded_and_follows_weight_changes(tiny_model, features, kept):
    """Folding (docs/mla.md): a small latent folds both projections under "auto"; folded, unfolded and
    materialised decoding agree, and folded weights are rebuilt when the weights change."""
    cfg = sw.MLAConfig(latent_dim=8, kept_dims=kept, modules=("decoder_self", "decoder_cross"), factorization="joint")
    slim = sw.convert(tiny_model, cfg).eval()
    mla = [m for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention)]
    assert all(m.fold_plan() == (True, True) for m in mla), "d_c=8 with 4 heads of 16 dims should fold both"
    folded = step_logits(slim, features)
    assert all(m._folded is not None and "q_weight" in m._folded[1] for m in mla), "folded weights were not used"
    sw.set_decode_mode(slim, "absorbed", fold="never")
    assert all(m.fold_plan() == (False, False) for m in mla)
    unfolded = step_logits(slim, features)
    sw.set_decode_mode(slim, "materialized")
    materialised = step_logits(slim, features)
    torch.testing.assert_close(folded, unfolded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(folded, materialised, atol=1e-4, rtol=1e-4)
    # change the weights in place (as an optimiser step would): the folded copies must follow
    with torch.no_grad():
        for m in mla:
            m.q_proj.weight.mul_(1.5)
            m.up_v.weight.add_(0.05)
    changed = step_logits(slim, features)
    sw.set_decode_mode(slim, "absorbed", fold="always")
    torch.testing.assert_close(step_logits(slim, features), changed, atol=1e-4, rtol=1e-4)
    assert (changed - materialised).abs().max() > 1e-3, "the weight change should change the outputs"


def test_folded_weights_built_in_inference_mode_serve_a_later_step_with_autograd(tiny_model, features):
    slim = sw.convert(tiny_model, sw.MLAConfig(latent_dim=8, factorization="joint")).eval()
    with torch.inference_mode():
        step_logits(slim, features, steps=2)  # builds the folded weights
    attn = slim.model.decoder.layers[0].self_attn
    assert attn.fold_plan() != (False, False)  # the step below does take the folded path
    params = {"kv_down": attn.kv_down.weight, "q_proj": attn.q_proj.weight, "out_proj": attn.out_proj.weight}

    def step_gradients() -> dict[str, torch.Tensor]:
        slim.zero_grad()
        enc = slim.model.encoder(features).last_hidden_state
        first = slim(encoder_outputs=(enc,), decoder_input_ids=PROMPT[:, :2], use_cache=True)
        step = slim(encoder_outputs=(enc,), decoder_input_ids=PROMPT[:, 2:3], past_key_values=first.past_key_values,
                    use_cache=True)
        step.logits.sum().backward()
        return {name: p.grad.clone() for name, p in params.items()}

    folded = step_gradients()  # the folded path with autograd on
    sw.set_decode_mode(slim, "materialized")
    # every projection gets the gradient the materialised step gives it (the folds are built in the graph)
    for name, grad in step_gradients().items():
        torch.testing.assert_close(folded[name], grad, atol=1e-6, rtol=1e-5, msg=name)
        assert grad.abs().max() > 1e-6


def test_large_latent_does_not_fold_and_quantised_projections_never_fold(tiny_model):
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))  # d_c = 32 of d = 64
    mla = [m for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention)]
    assert all(m.fold_plan() == (False, False) for m in mla)
    sw.set_decode_mode(slim, "absorbed", fold="always")
    assert all(m.fold_plan() == (True, True) for m in mla)
    quantised = sw.engine.quantize.quantize_dynamic_int8(slim)
    assert all(m.fold_plan() == (False, False) for m in quantised.modules() if isinstance(m, sw.WhisperMLAAttention))
    with pytest.raises(ValueError, match="fold"):
        sw.set_decode_mode(slim, "absorbed", fold="sometimes")


def test_generate_batched_and_beam(tiny_model, features):
    slim = sw.convert(tiny_model, sw.MLAConfig(modules=("decoder_self", "decoder_cross"), factorization="joint"))
    greedy = slim.generate(features, max_new_tokens=6)
    assert torch.equal(greedy, tiny_model.generate(features, max_new_tokens=6))
    beams = slim.generate(features, max_new_tokens=6, num_beams=3)
    assert torch.equal(beams, tiny_model.generate(features, max_new_tokens=6, num_beams=3))


def _padded_steps(model, features, mask, steps: int = 5) -> torch.Tensor:
    """Cached greedy decode of PROMPT with a decoder attention mask (row 0 left-padded); logits [steps, B, V]."""
    ids, cache, out = PROMPT, None, []
    with torch.no_grad():
        enc = model.model.encoder(features).last_hidden_state
        for _ in range(steps):
            res = model(encoder_outputs=(enc,), decoder_input_ids=ids if cache is None else ids[:, -1:],
                        decoder_attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, last = res.past_key_values, res.logits[:, -1]
            out.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(out)


@pytest.mark.parametrize("kept", [0, 4])
def test_absorbed_decode_with_padded_batch_and_greedy_tokens(tiny_model, features, kept):
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, kept_dims=kept, factorization="joint",
                                               modules=("decoder_self", "decoder_cross")))
    mask = torch.ones_like(PROMPT)
    mask[0, :3] = 0
    absorbed, tokens = _padded_steps(slim, features, mask), slim.generate(features, max_new_tokens=8)
    unmasked = _padded_steps(slim, features, torch.ones_like(PROMPT))
    assert float((absorbed[:, 0] - unmasked[:, 0]).abs().max()) > 1e-3, "the padding mask had no effect"
    sw.set_decode_mode(slim, "materialized")
    torch.testing.assert_close(absorbed, _padded_steps(slim, features, mask), atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, slim.generate(features, max_new_tokens=8))
