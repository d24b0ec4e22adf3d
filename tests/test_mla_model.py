"""MLA conversion on tiny random Whisper models: exactness, decode paths, cache bytes, save/load."""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSpeechSeq2Seq

import slimwhisper as sw
from slimwhisper.errors import ConfigVersionError, SlimWhisperError
from slimwhisper.memory import cache_bytes_held
from slimwhisper.mla import modules as mla_modules

COMBOS = [
    ("decoder_self",),
    ("decoder_cross",),
    ("encoder_self",),
    ("decoder_self", "decoder_cross"),
    ("decoder_self", "decoder_cross", "encoder_self"),
]
PROMPT = torch.tensor([[91, 93, 5, 6, 7, 8], [91, 93, 9, 3, 2, 1]])


def calib_audio(n: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(16000 * 2).astype(np.float32) * 0.1 for i in range(n)]


def logits(model, features, ids=PROMPT):
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=ids).logits


def step_logits(model, features, steps: int = 8) -> torch.Tensor:
    """Greedy decode with the cache, returning every step's logits [steps, B, V]."""
    ids, cache, out = PROMPT[:, :2], None, []
    with torch.no_grad():
        enc = model.model.encoder(features).last_hidden_state
        for _ in range(steps):
            res = model(encoder_outputs=(enc,), decoder_input_ids=ids if cache is None else ids[:, -1:],
                        past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            out.append(res.logits[:, -1])
            ids = torch.cat([ids, res.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return torch.stack(out)


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


@pytest.mark.parametrize("cfg", [
    sw.MLAConfig(kv_reduction=0.75),
    sw.MLAConfig(kv_reduction=0.75, kept_dims=4, selection="2norm", modules=("decoder_self", "decoder_cross")),
    sw.MLAConfig(kv_reduction=0.75, factorization="split", modules=("decoder_self", "decoder_cross")),
])
def test_absorbed_decode_equals_materialised(tiny_model, features, cfg):
    slim = sw.convert(tiny_model, cfg, calibration=calib_audio(), progress=False)
    with mock.patch.object(mla_modules, "latent_attention", wraps=mla_modules.latent_attention) as spy:
        absorbed = step_logits(slim, features)
    assert spy.call_count > 0, "decode did not take the absorbed path"
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
    enc = slim.model.encoder(features).last_hidden_state
    first = slim(encoder_outputs=(enc,), decoder_input_ids=PROMPT[:, :2], use_cache=True)
    step = slim(encoder_outputs=(enc,), decoder_input_ids=PROMPT[:, 2:3], past_key_values=first.past_key_values,
                use_cache=True)
    step.logits.sum().backward()  # the folded path with autograd on
    assert slim.model.decoder.layers[0].self_attn.kv_down.weight.grad is not None


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


@pytest.mark.parametrize("modules", [("decoder_self",), ("decoder_self", "decoder_cross")])
def test_cache_bytes_match_formula(tiny_model, features, modules):
    slim = sw.convert(tiny_model, sw.MLAConfig(modules=modules, kv_reduction=0.75, kept_dims=2, factorization="joint"))
    for model in (tiny_model, slim):
        out = model.generate(features, max_new_tokens=5, return_dict_in_generate=True)
        cache = out.past_key_values
        held = cache_bytes_held(cache)
        expected = sw.kv_cache_bytes(model, batch=2, tokens=cache.get_seq_length(), dtype=torch.float32)
        assert held == expected
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    per_token = sw.kv_cache_bytes(slim, tokens=1, dtype=torch.float16).self_attention
    assert per_token == layers * int(0.25 * 2 * d) * 2  # 75% fewer numbers than 2*d per layer, 2 bytes each


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
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
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


def test_unknown_format_version_is_a_clear_error(tmp_path, tiny_model):
    _saved(tmp_path, tiny_model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["compression"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigVersionError, match="upgrade"):
        AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs", [
    {"latent_dim": 65},  # wider than d_model
    {"kept_dims": 17},  # more than the head dim (16)
    {"kept_dims": 16, "kv_reduction": 0.875},  # kept dims alone exceed the budget
])
def test_impossible_geometry_is_rejected(tiny_model, kwargs):
    with pytest.raises(SlimWhisperError):
        sw.convert(tiny_model, sw.MLAConfig(factorization="joint", **kwargs))


@pytest.mark.parametrize("kwargs", [
    {"modules": ("decoder",)}, {"kv_reduction": 1.5}, {"latent_rank": 2, "kv_reduction": 0.5},
    {"selection": "best"}, {"factorization": "qr"}, {"kept_dims": 3, "selection": "high"},
])
def test_invalid_recipes_are_rejected(kwargs):
    with pytest.raises(SlimWhisperError):
        sw.MLAConfig(**kwargs)


def test_recipe_round_trips_and_refuses_newer_versions():
    cfg = sw.MLAConfig(modules=("decoder_self", "decoder_cross"), kept_dims=2, kv_reduction=0.75)
    assert sw.MLAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigVersionError):
        sw.MLAConfig.from_dict({**cfg.to_dict(), "version": 99})


def test_converting_twice_is_refused(tiny_model):
    slim = sw.convert(tiny_model, sw.MLAConfig(factorization="joint"))
    with pytest.raises(SlimWhisperError, match="already"):
        sw.convert(slim, sw.MLAConfig(factorization="joint"))


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


def test_converted_model_owns_its_tensors(tiny_model):
    """Training the compressed copy in place must leave the original (the distillation teacher) untouched."""
    for config in (sw.MLAConfig(factorization="joint", latent_rank=4), sw.LowRankConfig(rank=8, granule=8)):
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
        slim = sw.convert(tiny_model, config, calibration=[audio])
        theirs = {t.untyped_storage().data_ptr() for t in tiny_model.state_dict().values()}
        shared = [k for k, t in slim.state_dict().items() if t.untyped_storage().data_ptr() in theirs]
        assert not shared
        with torch.no_grad():
            for p in slim.parameters():
                p.add_(1.0)
        after = tiny_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
