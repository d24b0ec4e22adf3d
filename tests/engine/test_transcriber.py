"""Long-form transcription: sequential mode equals transformers' long-form `generate`; batched mode's windows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimwhisper as sw
from conftest import REALSPEECH, byte_whisper_pair, needs_realspeech, realspeech_audio
from slimwhisper.audio import SAMPLE_RATE
from slimwhisper.engine.decode import greedy_decode
from slimwhisper.engine.transcriber import WINDOW_FRAMES, Thresholds, Transcriber

SIZE = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=96)


def long_form_model(seed: int):
    model, processor, _ = byte_whisper_pair(SIZE, ("en",), False, seed=seed, timestamps=True, max_length=96)
    with torch.no_grad():
        model.model.encoder.conv1.weight.mul_(20)  # the audio drives the output
        for layer in model.model.decoder.layers:
            layer.encoder_attn.v_proj.weight.mul_(8)
    return model, processor


def random_mel(frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(80, frames, generator=gen) * 0.5 + torch.randn(80, 1, generator=gen)


def generate_long_form(model, mel: torch.Tensor, condition: bool):
    """transformers' long-form generate on features [80, frames]: (start, end, tokens) per segment.

    A window's last closed segment keeps both timestamps of its closing pair there; the second belongs to
    the cut-off text that follows, so it is dropped here, as transformers drops it from the next prompt."""
    out = model.generate(mel[None], attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
                         return_timestamps=True, return_segments=True, condition_on_prev_tokens=condition)
    ts_begin = model.generation_config.no_timestamps_token_id + 1
    segments = []
    for s in out["segments"][0]:
        tokens = s["tokens"].tolist()
        if len(tokens) > 2 and tokens[-2] >= ts_begin:
            tokens = tokens[:-1]
        segments.append((round(float(s["start"]), 2), round(float(s["end"]), 2), tokens))
    return segments


@pytest.mark.parametrize("seed,condition", [(0, False), (1, True), (2, True)])
def test_sequential_equals_transformers_long_form(seed, condition):
    """Same features, same windows, same tokens: seeking, timestamps, the previous-text prompt and its cut-off."""
    model, processor = long_form_model(seed)
    mel = random_mel(7300, seed)
    expected = generate_long_form(model, mel, condition)
    engine = Transcriber(model, processor, vad=False)
    padded = torch.nn.functional.pad(mel, (0, WINDOW_FRAMES))  # transformers pads a short last window with zeros
    segments, _ = engine.sequential(padded, mel.shape[1], None, "transcribe", (0.0,), Thresholds(None, None, None),
                                    condition)
    kept = [(a, b, engine.decode_text(toks)) for a, b, toks in expected if engine.decode_text(toks).strip()]
    assert [(round(s.start, 2), round(s.end, 2), s.text) for s in segments] == kept
    assert len(expected) > 3 and engine.stats["windows"] >= 3  # several windows, several segments each


@pytest.mark.parametrize("vad", [True, False])
def test_silence_gives_no_text_in_either_mode(vad):
    """Digital silence never reaches the model: the detector hears nothing, and without it the energy check."""
    model, processor = long_form_model(0)
    engine = Transcriber(model, processor, vad=vad)
    silence = np.zeros(5 * SAMPLE_RATE, dtype=np.float32)
    for mode in ("batched", "sequential"):
        result = engine.transcribe(silence, mode=mode)
        assert result.text == "" and result.segments == [] and result.duration == 5.0
    assert engine.stats["windows"] == 0


def test_batched_windows_follow_the_speech_or_fixed_cuts():
    model, processor = long_form_model(0)
    engine = Transcriber(model, processor)
    noise = np.random.default_rng(0).normal(0, 0.01, 65 * SAMPLE_RATE).astype(np.float32)  # -40 dBFS hiss
    fixed = engine.windows(noise, 3, vad=False)
    assert [w.offset for w in fixed] == [0.0, 30.0, 60.0] and len(fixed[-1].audio) == 5 * SAMPLE_RATE
    assert {w.source for w in fixed} == {3}
    assert engine.windows(noise, 0, vad=True) == []  # the detector hears no speech in hiss
    gap = noise.copy()
    gap[29 * SAMPLE_RATE : 61 * SAMPLE_RATE] = 0  # without the detector, only the silent window is dropped
    assert [w.offset for w in engine.windows(gap, 0, vad=False)] == [0.0, 60.0]


# ------------------------------------------------------------------ real weights, minutes of real speech


def joined_realspeech(language: str, step: int) -> tuple[np.ndarray, str]:
    """Every `step`-th realspeech clip of `language` (so every source is in) joined with 0.6 s pauses, and
    their joined references."""
    from slimwhisper.audio import load_audio
    from slimwhisper.bench.longform import join_recordings

    rows = [json.loads(line) for line in REALSPEECH.open()]
    rows = [r for r in rows if r["lang"] == language][::step]
    return join_recordings([load_audio(REALSPEECH.parent / r["audio"]) for r in rows], [r["text"] for r in rows], 0.6)


def word_error_rate(ref: str, hyp: str, language: str) -> float:
    from slimwhisper.eval.metrics import corpus_wer

    return 100 * corpus_wer([ref], [hyp], language)


def generate_long_form_text(model, processor, audio: np.ndarray) -> str:
    from slimwhisper.decoding import generate_texts, generation_kwargs

    return generate_texts(model, processor, [audio], long_form=True, **generation_kwargs(model, None, 1))[0]


@pytest.mark.real
@needs_realspeech
@pytest.mark.parametrize("name,language,step", [("tiny.en", "en", 3), ("base", "de", 1)])
def test_long_recordings_keep_their_words(name, language, step):
    """Minutes of joined real speech: sequential mode gives `generate`'s long-form words, batched mode is as
    accurate, and both keep the words at window edges (few deletions)."""
    import slimwhisper as sw

    audio, reference = joined_realspeech(language, step)
    assert len(audio) > 2 * 30 * SAMPLE_RATE  # several windows
    model, processor = sw.load(name)
    engine = Transcriber(model, processor)
    expected = generate_long_form_text(model, processor, audio)
    sequential = engine.transcribe(audio, mode="sequential")
    batched = engine.transcribe(audio)
    assert word_error_rate(expected, sequential.text, language) <= 1.0
    reference_wer = word_error_rate(reference, expected, language)
    assert word_error_rate(reference, sequential.text, language) <= reference_wer + 0.3
    assert word_error_rate(reference, batched.text, language) <= reference_wer + 1.0
    assert sequential.language == batched.language == language
    ends = [s.end for s in batched.segments]
    assert ends == sorted(ends) and ends[-1] <= len(audio) / SAMPLE_RATE


def test_windows_keep_their_recordings_language_unless_sure_of_another():
    """A recording's first window sets its language; a later window switches only when the detector is sure."""
    from slimwhisper.engine.transcriber import _Window

    model, processor, ids = byte_whisper_pair(SIZE, ("en", "de"), True, seed=0)
    engine = Transcriber(model, processor)
    en, de = ids["<|en|>"], ids["<|de|>"]
    outcomes = {1: (de, 0.9), 2: (en, 0.3), 3: (en, 0.9)}  # a fake detector: code in the encoder output
    engine.language_probabilities = lambda enc: tuple(zip(*[outcomes[int(row[0, 0])] for row in enc]))
    piece = np.zeros(SAMPLE_RATE, dtype=np.float32)
    chunk = [_Window(0, 0.0, piece), _Window(0, 30.0, piece), _Window(1, 0.0, piece), _Window(0, 60.0, piece)]
    enc = torch.tensor([1.0, 2.0, 2.0, 3.0])[:, None, None].expand(4, 2, 3)
    languages: dict = {}
    engine._assign_languages(chunk, enc, None, languages)
    assert [w.language for w in chunk] == [de, de, en, en] and languages == {0: de, 1: en}
    engine._assign_languages(chunk, enc, de, {})
    assert [w.language for w in chunk] == [de] * 4  # a given language wins


def test_fallback_retries_failing_rows_and_keeps_the_best_attempt():
    """Rows that pass stay; failing rows go hotter; a row failing at every temperature keeps its most probable
    attempt that does not loop (not the last one). Improbable rows are retried only when asked; loops always."""
    from slimwhisper.engine.decode import Decoded

    model, processor = long_form_model(0)
    engine = Transcriber(model, processor)
    calls = []
    # row 0 passes at once; row 1 is improbable at every temperature, least so at 0.2; row 2 loops at 0.0 only
    logprob = {0: {0.0: -0.1}, 1: {0.0: -3.0, 0.2: -1.5, 0.4: -2.0}, 2: {0.0: -0.2, 0.2: -0.3}}

    def fake_decode(enc, prompt, timestamps, temperature):
        rows = [int(r[0]) for r in prompt]
        calls.append((temperature, rows))
        tokens = {0: [65] * 3, 1: [66] * 3, 2: [67] * 200 if temperature == 0 else [67, 68, 69]}
        return [Decoded(tokens[r], sum_logprob=4 * logprob[r][temperature], temperature=temperature) for r in rows]

    engine._decode = fake_decode
    prompts, enc = [[0, 1], [1, 1], [2, 1]], torch.zeros(3, 4, 64)
    out = engine.decode_rows(enc, prompts, False, (0.0, 0.2, 0.4), Thresholds(retry_improbable=True))
    assert calls == [(0.0, [0, 1, 2]), (0.2, [1, 2]), (0.4, [1])]
    assert [r.temperature for r in out] == [0.0, 0.2, 0.2]
    assert engine.stats["retries"] == 3 and engine.stats["windows"] == 3
    calls.clear()
    out = engine.decode_rows(enc, prompts, False, (0.0, 0.2, 0.4), Thresholds())  # default: loops only
    assert calls == [(0.0, [0, 1, 2]), (0.2, [2])] and [r.temperature for r in out] == [0.0, 0.0, 0.2]
    looping = Decoded([5] * 3, sum_logprob=-0.4)
    best = Thresholds().best([Decoded([1], sum_logprob=-4.0), looping], lambda t: "la " * 50 if t == [5] * 3 else "x")
    assert best.sum_logprob == -4.0  # the looping attempt is more probable, but it loops


def test_sequential_skips_silence_and_resumes_where_speech_was_left_unheard():
    from slimwhisper.engine.transcriber import _next_speech, _unheard_rest

    speech = [(100, 900), (5000, 5600)]  # frames
    assert _next_speech(0, speech) == 0  # speech within the window: decode from here
    assert _next_speech(950, speech) == 5000 - 40  # 40 s of silence ahead: jump to just before the next speech
    assert _next_speech(5600, speech) > 10**9  # no speech left: done
    # a window [0, 3000) whose last segment ends at frame 600: 300 frames of speech follow, unheard
    assert _unheard_rest(600, (0, 3000), speech)
    assert not _unheard_rest(880, (0, 3000), speech)  # 0.2 s of speech after it: a word's tail, not a sentence
    assert not _unheard_rest(0, (0, 3000), speech)  # nothing closed: nothing to resume from


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


@pytest.mark.real
@needs_realspeech
def test_trailing_silence_and_room_tone_add_no_segments():
    """A spoken clip followed by 50 s of -50 dBFS hiss: no mode, with or without the detector, writes text
    after the speech (Whisper alone writes "you" on the last, short stretch of hiss)."""
    import slimwhisper as sw
    from slimwhisper.audio import load_audio

    clip = load_audio(sorted((REALSPEECH.parent / "en").glob("*.flac"))[3])
    hiss = np.random.default_rng(0).normal(0, 10 ** (-50 / 20), 50 * SAMPLE_RATE)  # a short last window
    audio = np.concatenate([clip, hiss]).astype(np.float32)
    model, processor = sw.load("tiny.en")
    spoken = Transcriber(model, processor).transcribe(clip).text
    for vad in (True, False):
        engine = Transcriber(model, processor, vad=vad)
        for mode in ("batched", "sequential"):
            result = engine.transcribe(audio, mode=mode)
            assert [s for s in result.segments if s.start >= len(clip) / SAMPLE_RATE] == []
            assert word_error_rate(spoken, result.text, "en") <= 5.0, (vad, mode)
