"""The fast engine: static cache, logit rules vs transformers' processors, greedy parity with generate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperTimeStampLogitsProcessor,
)

import slimwhisper as sw
from conftest import EOT, NO_TS, PREV, SHARED_DATA, SOT, tiny_whisper
from slimwhisper.engine.beam import beam_decode, can_still_improve, length_normalised
from slimwhisper.engine.cache import FixedLayer, StaticEncoderDecoderCache, StaticLayer
from slimwhisper.engine.decode import (
    DecoderRunner,
    FusedMLA,
    LayerCalls,
    cross_attention,
    fuse_mla,
    fuse_qkv,
    greedy_decode,
    mla_self_attention,
    prefill,
    self_attention,
    transpose_frames_,
)
from slimwhisper.engine.formats import to_srt, to_vtt
from slimwhisper.engine.quantize import (
    Int8Call,
    direct_call,
    quantize_dynamic_int8,
    quantize_linear_int8,
    stack_int8_rows,
)
from slimwhisper.engine.rules import LogitRules, TokenIds
from slimwhisper.engine.transcriber import Segment, Transcriber, Transcription


def varied_whisper(seed: int = 0):
    """A tiny random Whisper whose greedy output depends on the audio and ends at different steps."""
    model = tiny_whisper(seed)
    with torch.no_grad():
        model.model.decoder.embed_positions.weight.normal_(0, 0.5)
        model.proj_out.weight = torch.nn.Parameter(torch.randn(100, 64))  # untied: no echo of the input token
        for layer in model.model.decoder.layers:
            layer.encoder_attn.v_proj.weight.mul_(8)
        model.model.encoder.conv1.weight.mul_(20)  # audio, not the positional embedding, drives the encoder
    model.generation_config.suppress_tokens = [SOT, 92, NO_TS]
    model.generation_config.begin_suppress_tokens = [EOT]
    return model


def varied_features(batch: int = 4, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 80, 3000) * 0.5 + 2 * torch.randn(batch, 80, 1)


def engine_tokens(model, features: torch.Tensor) -> list[list[int]]:
    runner = DecoderRunner(model)
    ids = TokenIds.from_generation_config(model.generation_config)
    prompt = torch.tensor([[ids.sot, ids.no_timestamps]] * features.shape[0])
    return [d.tokens for d in greedy_decode(runner, runner.encode(features), prompt, ids)]


def generate_tokens(model, features: torch.Tensor) -> list[list[int]]:
    out = model.generate(features, do_sample=False)
    return [[t for t in row.tolist() if t != EOT] for row in out]


# ------------------------------------------------------------------ cache
def test_static_cache_writes_in_place_and_returns_views(tiny_model):
    cache = StaticEncoderDecoderCache.for_model(tiny_model, batch=3, max_len=10)
    layer = cache.self_attention_cache.layers[0]
    buf = layer.keys.data_ptr()
    k1, v1 = torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    keys, values = cache.self_attention_cache.update(k1, v1, 0)
    assert keys.shape == (3, 4, 2, 16) and keys.data_ptr() == buf  # a view of the buffer, no copy
    k2 = torch.randn(3, 4, 1, 16)
    keys, _ = cache.self_attention_cache.update(k2, k2, 0)
    assert keys.shape[2] == 3 and torch.equal(keys[:, :, 2:], k2) and torch.equal(keys[:, :, :2], k1)
    assert cache.get_seq_length(0) == 3 and layer.keys.data_ptr() == buf
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.keys[0, :, :2], k1[2]) and torch.equal(layer.keys[1, :, 2:3], k2[0])
    cache.select_rows(torch.tensor([1]))
    assert layer.keys.shape[0] == 1 and torch.equal(layer.keys[0, :, :2], k1[0])
    cache.reset()
    assert cache.get_seq_length(0) == 0 and not any(cache.is_updated.values())
    with pytest.raises(ValueError, match="static cache holds 10"):
        cache.self_attention_cache.update(torch.randn(1, 4, 11, 16), torch.randn(1, 4, 11, 16), 0)


def test_static_cache_shapes_follow_mla_modules(tiny_model):
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    cache = StaticEncoderDecoderCache.for_model(slim, batch=2, max_len=7)
    attn = slim.model.decoder.layers[0].self_attn
    layer = cache.self_attention_cache.layers[0]
    assert layer.keys.shape == (2, 1, 7, attn.latent_dim) and layer.values.shape == (2, 4, 7, attn.kept_dims)
    assert attn.latent_dim < 2 * 64


# ------------------------------------------------------------------ rules
def _hf_processors(config: GenerationConfig, begin: int, timestamps: bool) -> list:
    procs = [
        SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin_index=begin),
        SuppressTokensLogitsProcessor(config.suppress_tokens),
    ]
    if timestamps:
        procs.append(WhisperTimeStampLogitsProcessor(config, begin_index=begin))
    return procs


@pytest.mark.parametrize("timestamps", [False, True])
def test_rules_equal_transformers_processors(timestamps):
    vocab, batch, begin = 120, 6, 2
    config = GenerationConfig(
        eos_token_id=EOT, no_timestamps_token_id=NO_TS, suppress_tokens=[5, 17, 92], begin_suppress_tokens=[EOT, 3],
        max_initial_timestamp_index=10, decoder_start_token_id=SOT,
    )
    ids = TokenIds.from_generation_config(config)
    gen = torch.Generator().manual_seed(0)
    rules = LogitRules(ids, vocab, batch, timestamps=timestamps)
    seqs = torch.full((batch, begin), SOT)
    for step in range(12):
        logits = torch.randn(batch, vocab, generator=gen) * 3
        expected = logits.clone()
        for proc in _hf_processors(config, begin, timestamps):
            expected = proc(seqs, expected)
        got = rules.apply(logits.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), step
        # draw tokens that exercise text, timestamp pairs and EOT (the allowed argmax, or a random allowed one)
        allowed = ~torch.isinf(got)
        pick = torch.multinomial(allowed.float(), 1, generator=gen).squeeze(1)
        rules.advance(pick)
        seqs = torch.cat([seqs, pick[:, None]], dim=1)
    if timestamps:
        assert (seqs[:, begin:] > NO_TS).any() and (seqs[:, begin:] < EOT).any()


# ------------------------------------------------------------------ greedy parity
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
        pointers.append((id(runner._cache), layer._keys_full.data_ptr(),
                         runner._cache.cross_attention_cache.layers[0]._spare[0].data_ptr()))
    assert len(set(pointers)) == 1, "the second and third batches should reuse the first one's buffers"


def test_fixed_layer_compacts_its_kept_buffers_in_place():
    layer = FixedLayer()
    keys, values = layer.buffers((4, 2, 3, 5), (4, 2, 5, 3), torch.float32, "cpu")
    keys.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(keys))
    values.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(values))
    layer.update(keys, values)
    layer.select_rows(torch.tensor([0, 2, 3]))
    assert layer.keys.data_ptr() == keys.data_ptr() and layer.keys[:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    assert layer.values[:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    layer.reset()
    again = layer.buffers((3, 2, 3, 5), (3, 2, 5, 3), torch.float32, "cpu")
    assert again[0].data_ptr() == keys.data_ptr(), "the next window reuses the buffers"
    assert layer.buffers((5, 2, 3, 5), (5, 2, 5, 3), torch.float32, "cpu")[0].data_ptr() != keys.data_ptr()


def test_static_layer_compacts_in_place_grows_for_beams_and_resets_rows():
    layer = StaticLayer(4, ((2, 3), (2, 1)), max_len=6, dtype=torch.float32, device="cpu")
    keys = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).view(4, 2, 2, 3)
    layer.update(keys, keys[..., :1])
    full = layer._keys_full.data_ptr()
    layer.select_rows(torch.tensor([1, 2, 3]))  # finished rows leave: compacted in place
    assert layer.keys.data_ptr() == full and layer.keys.shape[0] == 3
    assert torch.equal(layer.keys[:, :, :2], keys[[1, 2, 3]])
    assert torch.equal(layer.values[:, :, :2], keys[[1, 2, 3]][..., :1])
    layer.select_rows(torch.tensor([2, 0]))  # any order
    assert layer.keys.data_ptr() == full and torch.equal(layer.keys[:, :, :2], keys[[3, 1]])
    layer.select_rows(torch.tensor([0, 0, 1, 1, 1]))  # beams repeat rows: more than the buffers hold
    assert layer.capacity_rows == 5 and torch.equal(layer.keys[:, :, :2], keys[[3, 3, 1, 1, 1]])
    layer.reset(3)
    assert layer.keys.shape[0] == 3 and layer.get_seq_length() == 0
    with pytest.raises(ValueError, match="rows"):
        layer.reset(6)


def test_greedy_matches_generate_for_mla():
    base = varied_whisper(3)
    slim = sw.convert(base, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    slim.generation_config = base.generation_config
    features = varied_features(3, seed=5)
    assert engine_tokens(slim, features) == generate_tokens(slim, features)


def test_transcriber_int8_quantisation_runs_on_mla(tiny_model):
    slim = sw.convert(varied_whisper(), sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    from slimwhisper.engine.quantize import quantize_dynamic_int8

    q = quantize_dynamic_int8(slim)
    assert type(q.model.decoder.layers[0].fc1).__name__ == "Linear" and "quantized" in type(q.proj_out).__module__
    assert isinstance(q.model.decoder.layers[0].self_attn.up_k, torch.nn.Linear)
    tokens = engine_tokens(q, varied_features(2))
    assert len(tokens) == 2


# ------------------------------------------------------------------ long form and formats
def test_srt_and_vtt():
    segs = [Segment(0.0, 1.5, " Hello."), Segment(3661.25, 3662.0, " World")]
    assert to_srt(segs) == "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nWorld\n"
    assert to_vtt(segs).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n")


# ------------------------------------------------------------------ real weights
REALSPEECH = SHARED_DATA / "realspeech" / "manifest.jsonl"
needs_realspeech = pytest.mark.skipif(not REALSPEECH.is_file(), reason=f"{REALSPEECH} not found")


def realspeech_audio(pick) -> list:
    """16 kHz arrays of the realspeech manifest rows that `pick(rows)` chooses, in its order."""
    from slimwhisper.audio import load_audio

    rows = [json.loads(line) for line in REALSPEECH.open()]
    return [load_audio(SHARED_DATA / "realspeech" / r["audio"]) for r in pick(rows)]


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


# ------------------------------------------------------------------ beam search
def engine_beam_tokens(model, features: torch.Tensor, k: int, timestamps: bool = False, **kwargs) -> list[list[int]]:
    runner = DecoderRunner(model)
    ids = TokenIds.from_generation_config(model.generation_config)
    prompt = torch.tensor([[ids.sot] if timestamps else [ids.sot, ids.no_timestamps]] * features.shape[0])
    decoded = beam_decode(runner, runner.encode(features), prompt, ids, beam_size=k, timestamps=timestamps, **kwargs)
    return [d.tokens for d in decoded]


def generate_beam_tokens(model, features: torch.Tensor, k: int, timestamps: bool = False, **kwargs) -> list[list[int]]:
    """`generate(num_beams=k)`'s hypotheses from one beam search call.

    Random models emit timestamp tokens even without timestamps, and Whisper's `generate` then seeks and
    decodes the window again (and concatenates); `force_unique_generate_call` keeps the first search only.
    """
    out = model.generate(features, num_beams=k, do_sample=False, return_timestamps=timestamps,
                         return_dict_in_generate=True, force_unique_generate_call=True, **kwargs).sequences
    plen = 1 if timestamps else 2
    return [[t for t in row.tolist()[plen:] if t != EOT] for row in out]


@pytest.mark.parametrize("seed,k,timestamps,options", [
    (0, 3, False, {}),
    (4, 5, False, {}),
    (5, 3, True, {}),
    (0, 3, False, {"early_stopping": True}),
    (5, 3, False, {"early_stopping": "never", "length_penalty": 0.5}),
])
def test_beam_matches_generate(seed, k, timestamps, options):
    model, features = varied_whisper(seed), varied_features(4, seed=seed + 1)
    ours = engine_beam_tokens(model, features, k, timestamps, **options)
    assert ours == generate_beam_tokens(model, features, k, timestamps, **options)
    lengths = [len(t) for t in ours]
    assert min(lengths) < 40 and max(lengths) == 64 - (1 if timestamps else 2)  # EOT-ended and max-length rows


def test_beam_search_differs_from_greedy_and_scores_better():
    model, features = varied_whisper(5), varied_features(4, seed=6)
    runner = DecoderRunner(model)
    ids = TokenIds.from_generation_config(model.generation_config)
    prompt = torch.tensor([[ids.sot, ids.no_timestamps]] * 4)
    enc = runner.encode(features)
    greedy = greedy_decode(runner, enc, prompt, ids)
    beams = beam_decode(runner, enc, prompt, ids, beam_size=3)
    assert [g.tokens for g in greedy] != [b.tokens for b in beams]
    for g, b in zip(greedy, beams):
        assert b.no_speech_prob == pytest.approx(g.no_speech_prob)
        assert b.sum_logprob <= 0 and np.isfinite(b.avg_logprob)
        assert b.extras["score"] == pytest.approx(b.extras["score"])  # a finite, comparable score
        if b.tokens == g.tokens:
            assert b.sum_logprob == pytest.approx(g.sum_logprob, abs=1e-4)  # same renormalised log-probs


def test_beam_matches_generate_for_mla():
    base = varied_whisper(4)
    slim = sw.convert(base, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    slim.generation_config = base.generation_config
    features = varied_features(3, seed=5)
    assert engine_beam_tokens(slim, features, 3) == generate_beam_tokens(slim, features, 3)


def test_beam_stopping_rules():
    pool = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    full = torch.tensor([[True, True], [True, False]])
    # audio 0: best running -5 over 2 tokens = -2.5 < worst pooled -2: cannot improve; audio 1: a slot is free
    assert can_still_improve(torch.tensor([-5.0, -5.0]), pool, full, 2, 1.0).tolist() == [False, True]
    assert can_still_improve(torch.tensor([-3.0, -5.0]), pool, full, 2, 1.0).tolist() == [True, True]
    assert length_normalised(torch.tensor(-6.0), 4, 0.5).item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="beam_size"):
        engine_beam_tokens(varied_whisper(), varied_features(1), 0)


def test_cli_beams_reach_the_engine(monkeypatch, tmp_path, capsys):
    import soundfile as sf

    from slimwhisper import cli, engine

    seen = {}

    class Recorder:
        def __init__(self, model, processor, **kwargs):
            seen.update(kwargs)

        def transcribe(self, audios, **kwargs):
            return [Transcription("hi", [], "en", 1.0) for _ in audios]

    monkeypatch.setattr(engine, "Transcriber", Recorder)
    monkeypatch.setattr(sw, "load", lambda name, device=None: (None, None))
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16_000, dtype=np.float32), 16_000)
    assert cli.main(["transcribe", "tiny.en", str(wav), "--beams", "4"]) == 0
    assert seen["beam_size"] == 4 and "hi" in capsys.readouterr().out


@pytest.mark.real
@needs_realspeech
def test_beam_parity_with_generate_on_tiny_en():
    from slimwhisper.decoding import generation_kwargs

    audios = realspeech_audio(lambda rows: [r for r in rows if r["lang"] == "en"][:3])
    model, processor = sw.load("tiny.en")
    engine = Transcriber(model, processor, batch_size=3, beam_size=3)
    feats = engine.features(audios)
    ours = engine_beam_tokens(model, feats, 3)
    ref = model.generate(feats, **generation_kwargs(model, None, 3))
    texts = processor.batch_decode(ref, skip_special_tokens=True)
    eot = model.generation_config.eos_token_id
    assert ours == [[t for t in row.tolist() if t != eot] for row in ref]
    results = engine.transcribe(audios, temperature=0.0)
    assert [r.text for r in results] == [t.strip() for t in texts]


@pytest.mark.real
@needs_realspeech
def test_multilingual_greedy_parity_on_base():
    """Language given (prompt SOT de transcribe notimestamps) and detected per row, as `generate` does."""
    from slimwhisper.decoding import generation_kwargs

    ids = ("de_fleurs_de_de_test_004", "fr_fleurs_fr_fr_test_002")
    audios = realspeech_audio(lambda rows: [next(r for r in rows if r["id"] == i) for i in ids])
    model, processor = sw.load("base")
    engine = Transcriber(model, processor, batch_size=2)
    eot = model.generation_config.eos_token_id

    def ref_tokens(feats, language):
        out = model.generate(feats, **generation_kwargs(model, language, 1))
        return [[t for t in row.tolist() if t != eot] for row in out]

    feats = engine.features(audios)
    enc = engine.runner.encode(feats)
    langs = engine.detect_language(enc)
    assert processor.tokenizer.convert_ids_to_tokens(langs) == ["<|de|>", "<|fr|>"]
    prompt = torch.tensor([engine.sot_sequence(lg, "transcribe", False) for lg in langs])
    ours = [d.tokens for d in greedy_decode(engine.runner, enc, prompt, engine.ids)]
    assert ours == ref_tokens(feats, None)
    prompt = torch.tensor([engine.sot_sequence(engine.language_id("de"), "transcribe", False)])
    assert [d.tokens for d in greedy_decode(engine.runner, enc[:1], prompt, engine.ids)] == ref_tokens(feats[:1], "de")
    results = engine.transcribe(audios, temperature=0.0)
    assert [r.language for r in results] == ["de", "fr"]
    assert [r.text for r in results] == [processor.decode(t, skip_special_tokens=True).strip() for t in ours]


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


def test_direct_int8_calls_give_the_modules_results_bitwise():
    """`direct_call` runs an int8 linear's op itself (float modules are returned as they are);
    `stack_int8_rows` keeps every row's int8 weights and scale, so one call equals the separate calls."""
    gen = torch.Generator().manual_seed(0)
    float_linears = [torch.nn.Linear(16, n, bias=b) for n, b in ((8, False), (12, True), (8, True))]
    for lin in float_linears:
        torch.nn.init.normal_(lin.weight, generator=gen)
    per_tensor = quantize_dynamic_int8(torch.nn.Sequential(*[torch.nn.Sequential(m) for m in float_linears]))
    modules = [per_tensor[i][0] for i in range(3)] + [quantize_linear_int8(float_linears[1])]  # last: per row
    x = torch.randn(2, 5, 16, generator=gen) * 3
    with torch.inference_mode():
        for m in modules:
            assert isinstance(direct_call(m), Int8Call) and torch.equal(direct_call(m)(x), m(x))
        assert direct_call(float_linears[0]) is float_linears[0]
        stacked = stack_int8_rows(modules)
        assert torch.equal(stacked(x), torch.cat([m(x) for m in modules], dim=-1))
    assert stack_int8_rows([modules[0], float_linears[1]]) is None and stack_int8_rows([]) is None


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


def test_runner_uses_own_cross_attention_only_for_plain_attention_on_cpu():
    model = tiny_whisper().eval()
    assert DecoderRunner(model).own_cross == [True] * model.config.decoder_layers
    slim = sw.convert(model, sw.MLAConfig(modules=("decoder_self", "decoder_cross"), kv_reduction=0.5))
    assert DecoderRunner(slim).own_cross == [False] * model.config.decoder_layers


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
