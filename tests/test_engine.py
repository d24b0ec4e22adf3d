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
from conftest import EOT, NO_TS, SHARED_DATA, SOT, tiny_whisper
from slimwhisper.engine.cache import StaticEncoderDecoderCache
from slimwhisper.engine.decode import DecoderRunner, greedy_decode
from slimwhisper.engine.formats import to_srt, to_vtt
from slimwhisper.engine.rules import LogitRules, TokenIds
from slimwhisper.engine.transcriber import Segment, Transcriber, parse_segments, split_windows


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
def test_split_windows_and_segments():
    audio = np.zeros(16_000 * 65, dtype=np.float32)
    windows = split_windows(audio, 0)
    assert [w.offset for w in windows] == [0.0, 30.0, 60.0] and len(windows[-1].audio) == 16_000 * 5
    tb = 100
    segs = parse_segments([tb, 1, 2, tb + 50, tb + 50, 3, tb + 100], tb, 30.0, 60.0, lambda t: " " + "x" * len(t))
    assert [(s.start, s.end, s.text) for s in segs] == [(30.0, 31.0, " xx"), (31.0, 32.0, " x")]
    segs = parse_segments([tb, 1, 2, tb + 50, tb + 50, 3], tb, 0.0, 9.5, lambda t: "w" * len(t))
    assert (segs[-1].start, segs[-1].end) == (1.0, 9.5)  # an unclosed segment ends with the window


def test_srt_and_vtt():
    segs = [Segment(0.0, 1.5, " Hello."), Segment(3661.25, 3662.0, " World")]
    assert to_srt(segs) == "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nWorld\n"
    assert to_vtt(segs).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n")


# ------------------------------------------------------------------ real weights
@pytest.mark.real
def test_token_parity_with_generate_on_tiny_en():
    from slimwhisper.audio import load_audio

    rows = [json.loads(line) for line in (SHARED_DATA / "realspeech" / "manifest.jsonl").open()]
    en = [r for r in rows if r["lang"] == "en"][:3]
    audios = [load_audio(SHARED_DATA / "realspeech" / r["audio"]) for r in en]
    model, processor = sw.load("tiny.en")
    engine = Transcriber(model, processor, batch_size=3)
    feats = engine._features(audios)
    ours = engine_tokens(model, feats)
    ref = model.generate(feats, do_sample=False)
    ref = [[t for t in row.tolist() if t != model.generation_config.eos_token_id] for row in ref]
    assert ours == ref
    texts = [r.text for r in engine.transcribe(audios, temperature=0.0)]
    assert texts[1] == processor.batch_decode(model.generate(feats[1:2]), skip_special_tokens=True)[0].strip()
