"""engine/beam.py: beam search equals generate(num_beams=k), its stopping rules and scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slimwhisper as sw
from conftest import EOT, needs_realspeech, realspeech_audio, varied_features, varied_whisper
from slimwhisper.engine.beam import beam_decode, can_still_improve, length_normalised
from slimwhisper.engine.decode import DecoderRunner, greedy_decode
from slimwhisper.engine.rules import TokenIds
from slimwhisper.engine.transcriber import Transcriber


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

    def score(row: int, tokens: list[int]) -> float:
        """Sum of the model's log-probs of `tokens` (+ EOT unless cut at the maximum length) / generated length."""
        seq = [ids.sot, ids.no_timestamps, *tokens] + ([EOT] if len(tokens) + 2 < 64 else [])
        x = torch.tensor([seq])
        with torch.no_grad():
            logprobs = model(encoder_outputs=(enc[row : row + 1],), decoder_input_ids=x[:, :-1]).logits.log_softmax(-1)
        return float(logprobs[0, 1:].gather(1, x[0, 2:, None]).sum()) / (len(seq) - 2)

    for row, (g, b) in enumerate(zip(greedy, beams)):
        assert b.no_speech_prob == pytest.approx(g.no_speech_prob)
        assert b.sum_logprob <= 0 and np.isfinite(b.avg_logprob)
        assert b.extras["score"] == pytest.approx(score(row, b.tokens), abs=1e-5)  # length-normalised, penalty 1
        assert b.extras["score"] >= score(row, g.tokens) - 1e-6  # never worse than the greedy path
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
