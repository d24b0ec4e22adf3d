"""engine/decode.py: greedy parity with generate, the runner's buffers, fused and own attention paths."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from conftest import (
    NO_TS,
    PREV,
    SOT,
    engine_tokens,
    generate_tokens,
    needs_realspeech,
    realspeech_audio,
    tiny_whisper,
    varied_features,
    varied_whisper,
)
from slimwhisper.engine.cache import FixedLayer, StaticEncoderDecoderCache
from slimwhisper.engine.decode import (
    DecoderRunner,
    FusedMLA,
    LayerCalls,
    cross_attention,
    fuse_mla,
    fuse_qkv,
    greedy_decode,
    mla_cross_attention,
    mla_self_attention,
    prefill,
    self_attention,
    transpose_frames_,
)
from slimwhisper.engine.quantize import Int8Call, quantize_dynamic_int8
from slimwhisper.engine.rules import TokenIds
from slimwhisper.engine.transcriber import Transcriber
from slimwhisper.errors import SlimWhisperError
from slimwhisper.memory import int8_cache_bytes, kv_cache_bytes


def test_greedy_matches_generate_with_different_lengths():
    model, features = varied_whisper(), varied_features(4)
    ours, ref = engine_tokens(model, features), generate_tokens(model, features)
    assert ours == ref
    assert len({tuple(t[:5]) for t in ours}) > 1  # the rows really differ


def test_one_runner_reuses_its_buffers_and_decodes_like_fresh_ones():
    """Batches decoded one after another on one runner (buffers reused, rows compacted in place, a smaller
    batch in the same buffers) give the tokens fresh runners give."""
    model = varied_whisper()
    ids = TokenIds.from_generation_config(model.generation_config)
    runner = DecoderRunner(model)
    batches = [varied_features(4, seed=1), varied_features(3, seed=7), varied_features(4, seed=9)]
    pointers = []
    for features in batches:
        prompt = torch.tensor([[ids.sot, ids.no_timestamps]] * features.shape[0])
        reused = [d.tokens for d in greedy_decode(runner, runner.encode(features), prompt, ids)]
        assert reused == engine_tokens(model, features)
        layer = runner._cache.self_attention_cache.layers[0]
        pointers.append((id(runner._cache), layer._full[0].data_ptr(),
                         runner._cache.cross_attention_cache.layers[0]._spare[0].data_ptr()))
    assert len(set(pointers)) == 1, "the second and third batches should reuse the first one's buffers"


def test_greedy_matches_generate_for_mla():
    base = varied_whisper(3)
    slim = sw.convert(base, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    slim.generation_config = base.generation_config
    features = varied_features(3, seed=5)
    assert engine_tokens(slim, features) == generate_tokens(slim, features)


@pytest.mark.real
@needs_realspeech
def test_token_parity_with_generate_on_tiny_en():
    audios = realspeech_audio(lambda rows: [r for r in rows if r["lang"] == "en"][:3])
    model, processor = sw.load("tiny.en")
    engine = Transcriber(model, processor, batch_size=3)
    feats = engine.features(audios)
    ours = engine_tokens(model, feats)
    ref = model.generate(feats, do_sample=False)
    ref = [[t for t in row.tolist() if t != model.generation_config.eos_token_id] for row in ref]
    assert ours == ref
    texts = [r.text for r in engine.transcribe(audios, temperature=0.0)]
    assert texts[1] == processor.batch_decode(model.generate(feats[1:2]), skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("int8", [False, True])
def test_own_cross_attention_equals_whisper_attention(length, int8):
    """The engine's cross-attention (keys cached transposed) gives WhisperAttention's output, call after call,
    with float linears (keys as W_k x^T) and int8 ones (keys projected, then transposed)."""
    model = tiny_whisper(seed=3).eval()
    if int8:
        model = sw.engine.quantize.quantize_dynamic_int8(model)
    attn = model.model.decoder.layers[1].encoder_attn
    gen = torch.Generator().manual_seed(0)
    enc, layer = torch.randn(2, 30, model.config.d_model, generator=gen), FixedLayer()
    with torch.inference_mode():
        for _ in range(2):  # the second call reads the cached keys/values
            hidden = torch.randn(2, length, model.config.d_model, generator=gen)
            ref, _ = attn(hidden, key_value_states=enc)
            torch.testing.assert_close(cross_attention(attn, hidden, layer, enc), ref, atol=1e-5, rtol=1e-5)
    assert layer.keys_transposed and layer.keys.shape == (2, attn.num_heads, attn.head_dim, 30)
    assert layer.get_seq_length() == 30
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.keys_transposed


def test_prefill_sends_only_the_sot_and_last_positions_to_the_lm_head():
    """`runner(at=...)` gives the model's logits at the positions asked for; `prefill` takes the last and,
    for P(<|nospeech|>), each row's SOT, which follows previous text when there is some."""
    model = varied_whisper(2).eval()
    runner, ids = DecoderRunner(model), TokenIds.from_generation_config(model.generation_config)
    prompt = torch.tensor([[PREV, 5, 6, SOT, NO_TS], [PREV, 7, 8, SOT, NO_TS]])
    with torch.inference_mode():
        enc = runner.encode(varied_features(2, seed=4))
        ref = model(encoder_outputs=(enc,), decoder_input_ids=prompt).logits  # [B, P, V]
        every = torch.arange(prompt.shape[1]).expand(2, -1)
        torch.testing.assert_close(runner(prompt, runner.new_cache(2, 16, enc.dtype), enc, at=every), ref,
                                   atol=1e-5, rtol=1e-5)
        last, no_speech = prefill(runner, prompt, runner.new_cache(2, 16, enc.dtype), enc, ids)
    torch.testing.assert_close(last, ref[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_speech, ref[:, 3].softmax(-1)[:, ids.no_speech], atol=1e-6, rtol=1e-5)
    assert ids.no_speech is not None and not torch.allclose(ref[:, 3], ref[:, -1])  # the SOT row is its own


def test_transpose_frames_copies_block_by_block_exactly():
    src = torch.randn(2, 10, 6)[:, :, :5]  # strided, 10 frames: blocks of 4, 4 and 2
    dst = torch.full((2, 5, 10), float("nan"))
    transpose_frames_(dst, src, block=4)
    assert torch.equal(dst, src.transpose(1, 2))


def test_cross_attention_with_the_runners_direct_calls_is_bitwise_the_modules():
    """int8: one stacked k|v call and direct q/out calls cache and return exactly what the modules give."""
    model = quantize_dynamic_int8(tiny_whisper(seed=3).eval())
    layer_module = model.model.decoder.layers[1]
    calls = LayerCalls.of(layer_module)
    assert calls.cross_kv is not None and isinstance(calls.fc1, Int8Call)
    attn = layer_module.encoder_attn
    gen = torch.Generator().manual_seed(1)
    enc = torch.randn(3, 30, model.config.d_model, generator=gen)
    ours, theirs = FixedLayer(), FixedLayer()
    with torch.inference_mode():
        for length in (3, 1):  # prefill (projects the encoder output), then a step on the cached keys
            hidden = torch.randn(3, length, model.config.d_model, generator=gen)
            assert torch.equal(cross_attention(attn, hidden, ours, enc, calls),
                               cross_attention(attn, hidden, theirs, enc))
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert LayerCalls.of(tiny_whisper().model.decoder.layers[0]).cross_kv is None  # float: no stacking


def test_runner_runs_its_own_cross_attention_for_plain_and_mla_attention_on_cpu():
    model = tiny_whisper().eval()
    assert DecoderRunner(model).own_cross == [True] * model.config.decoder_layers
    slim = sw.convert(model, sw.MLAConfig(modules=("decoder_self", "decoder_cross"), kv_reduction=0.5))
    assert DecoderRunner(slim).own_cross == [True] * model.config.decoder_layers


@pytest.mark.parametrize("fold", ["never", "always"])
@pytest.mark.parametrize("int8", [False, True])
def test_mla_cross_attention_equals_the_materialised_module(fold, int8):
    """The engine's MLA cross-attention (absorbed at every length, latent cached once per window) gives the
    module's materialised output for a prefill and then steps, folded or not, float or int8 projections;
    the cache holds the latent [B, 1, T, d_c], not keys and values."""
    model = tiny_whisper(seed=5).eval()
    slim = sw.convert(model, sw.MLAConfig(modules=("decoder_cross",), kv_reduction=0.75))
    if int8:
        slim = quantize_dynamic_int8(slim)
    sw.mla.modules.set_decode_mode(slim, "absorbed", fold=fold)
    attn = slim.model.decoder.layers[1].encoder_attn
    gen = torch.Generator().manual_seed(2)
    enc, layer = torch.randn(2, 30, model.config.d_model, generator=gen), FixedLayer()
    calls = LayerCalls.of(slim.model.decoder.layers[1])
    with torch.inference_mode():
        for length in (3, 1, 1):
            hidden = torch.randn(2, length, model.config.d_model, generator=gen)
            ref, _ = attn(hidden, key_value_states=enc)  # no cache: the materialised path
            torch.testing.assert_close(mla_cross_attention(attn, hidden, layer, enc, calls), ref,
                                       atol=1e-4, rtol=1e-4)
    assert layer.keys.shape == (2, 1, 30, attn.latent_dim)


@pytest.mark.parametrize("int8", [False, True])
def test_fused_self_attention_equals_whisper_attention(int8):
    """The engine's self-attention (q, k, v from one fused linear) gives WhisperAttention's output and cache,
    for a prefill with a causal mask and then single steps; int8 fuses into a per-row int8 linear."""
    model = tiny_whisper(seed=4).eval()
    if int8:
        model = sw.engine.quantize.quantize_dynamic_int8(model)
    attn = model.model.decoder.layers[0].self_attn
    qkv = fuse_qkv(attn)
    assert (type(qkv).__module__.startswith("torch.ao.nn.quantized")) == int8
    ours = StaticEncoderDecoderCache.for_model(model, batch=2, max_len=8)
    ref = StaticEncoderDecoderCache.for_model(model, batch=2, max_len=8)
    gen = torch.Generator().manual_seed(0)
    visible = torch.ones(3, 3, dtype=torch.bool).tril()
    causal = torch.zeros(3, 3).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
    tol = 5e-3 if int8 else 1e-5  # int8: one scale per row against one per projection (outputs ~0.06)
    with torch.inference_mode():
        for length, mask in ((3, causal), (1, None), (1, None)):
            hidden = torch.randn(2, length, model.config.d_model, generator=gen)
            expected, _ = attn(hidden, past_key_values=ref, attention_mask=mask)
            got = self_attention(attn, qkv, hidden, ours.self_attention_cache.layers[0], mask)
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert ours.get_seq_length() == ref.get_seq_length() == 5


@pytest.mark.parametrize("kept,fold,int8,engine_fold", [
    (0, "never", False, None), (2, "never", False, None), (2, "always", False, None), (0, "always", False, None),
    (2, "never", True, None), (2, "auto", True, None), (2, "never", True, (True, True)),
    (0, "never", False, (True, False)),
])
def test_fused_mla_step_equals_the_modules_absorbed_decode(kept, fold, int8, engine_fold):
    """One decode step through the engine's fused [query | latent | kept] projection gives the MLA module's
    absorbed output and cache, folded or not (as the module's plan says, or as the engine is told, int8
    included), with kept key dims or none, float or int8 (per-row scales)."""
    config = sw.MLAConfig(kv_reduction=0.75, kept_dims=kept, factorization="joint")
    slim = sw.convert(tiny_whisper(seed=6).eval(), config)
    sw.mla.modules.set_decode_mode(slim, "absorbed", fold=fold)
    if int8:
        slim = sw.engine.quantize.quantize_dynamic_int8(slim)
    attn = slim.model.decoder.layers[1].self_attn
    fused = fuse_mla(attn, engine_fold)
    assert (type(fused.proj).__module__.startswith("torch.ao.nn.quantized")) == int8
    if engine_fold:
        expected_fold = engine_fold
    elif int8:  # int8 folds only when the engine is told to (it costs accuracy)
        expected_fold = (False, False)
    else:
        expected_fold = (fold == "always", fold == "always")
    assert (fused.query_folded, fused.output is not None) == expected_fold
    ours = StaticEncoderDecoderCache.for_model(slim, batch=2, max_len=8)
    ref = StaticEncoderDecoderCache.for_model(slim, batch=2, max_len=8)
    gen = torch.Generator().manual_seed(0)
    tol = 5e-3 if int8 else 1e-5
    with torch.inference_mode():
        prefill = torch.randn(2, 3, slim.config.d_model, generator=gen)
        for cache in (ours, ref):  # the prefill is the module's own (materialised) path in both
            attn(prefill, past_key_values=cache)
        for _ in range(2):
            hidden = torch.randn(2, 1, slim.config.d_model, generator=gen)
            expected, _ = attn(hidden, past_key_values=ref)
            got = mla_self_attention(attn, fused, hidden, ours.self_attention_cache.layers[1])
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    mine, theirs = ours.self_attention_cache.layers[1], ref.self_attention_cache.layers[1]
    assert mine.get_seq_length() == theirs.get_seq_length() == 5
    latent, expected_latent = mine.keys[:, :, :5], theirs.keys[:, :, :5]
    if int8:  # per-row against per-projection scales: compare the error with the latent's size
        assert (latent - expected_latent).norm() < 0.02 * expected_latent.norm()
    else:
        torch.testing.assert_close(latent, expected_latent, atol=tol, rtol=tol)
    assert mine.values.shape[-1] == kept


def test_runner_fuses_mla_self_attention_and_follows_the_decode_mode():
    """MLA self-attention (self-only conversion) runs fused in the engine's steps, giving generate's tokens;
    set to "materialized", the module's own path runs instead and the tokens stay the same."""
    base = varied_whisper(3)
    slim = sw.convert(base, sw.MLAConfig(kv_reduction=0.75, kept_dims=2, factorization="joint"))
    slim.generation_config = base.generation_config
    runner = DecoderRunner(slim)
    assert all(isinstance(f, FusedMLA) for f in runner.fused_mla) and runner.fused_qkv == [None] * 2
    features = varied_features(3, seed=5)
    calls = []
    original = sw.engine.decode.mla_self_attention
    sw.engine.decode.mla_self_attention = lambda *a: calls.append(1) or original(*a)
    try:
        fused_tokens = engine_tokens(slim, features)
        assert calls, "the fused MLA step was not used"
        calls.clear()
        sw.mla.modules.set_decode_mode(slim, "materialized")
        assert engine_tokens(slim, features) == fused_tokens and not calls
    finally:
        sw.engine.decode.mla_self_attention = original
    assert fused_tokens == generate_tokens(slim, features)


@pytest.mark.parametrize("modules", [None, ("decoder_self", "decoder_cross")])
def test_int8_kv_cache_decodes_as_the_float_cache_within_its_rounding(modules):
    """kv_cache="int8": every self and cross layer holds int8 numbers with float scales; the logits stay within
    int8 rounding of the float cache's and greedy decoding gives the same tokens (MHA and MLA layers)."""
    model = varied_whisper(2).eval()
    if modules:
        model = sw.convert(model, sw.MLAConfig(modules=modules, kv_reduction=0.5))
    ids = TokenIds.from_generation_config(model.generation_config)
    features = varied_features(3, seed=6)
    logits, tokens = {}, {}
    for kind in ("float", "int8"):
        runner = DecoderRunner(model, kv_cache=kind)
        with torch.inference_mode():
            enc = runner.encode(features)
            prompt = torch.tensor([[SOT, NO_TS]] * 3)
            cache = runner.new_cache(3, 24, enc.dtype)
            steps = [runner(prompt, cache, enc), runner(torch.tensor([[5], [6], [7]]), cache, enc)]
            layers = cache.self_attention_cache.layers + cache.cross_attention_cache.layers
            assert {layer.keys.dtype for layer in layers} == {torch.int8 if kind == "int8" else torch.float32}
            held = (cache.nbytes(), sum(layer.nbytes() for layer in cache.cross_attention_cache.layers))
            formula = (int8_cache_bytes(model, 3, 24, encoder_frames=enc.shape[1]) if kind == "int8"
                       else kv_cache_bytes(model, 3, 24, torch.float32, encoder_frames=enc.shape[1]))
            assert held == (formula.self_attention, formula.cross_attention)
            logits[kind] = torch.stack(steps)
            tokens[kind] = [d.tokens for d in greedy_decode(runner, enc, prompt, ids, max_length=16)]
    spread = logits["float"].abs().max()
    torch.testing.assert_close(logits["int8"], logits["float"], atol=0.02 * spread, rtol=0)
    assert not torch.equal(logits["int8"], logits["float"])  # the int8 cache is really in use
    assert tokens["int8"] == tokens["float"]


def test_kv_cache_kind_is_checked():
    with pytest.raises(SlimWhisperError, match="kv_cache"):
        DecoderRunner(tiny_whisper().eval(), kv_cache="int4")
