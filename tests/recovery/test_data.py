"""recovery/data.py: labels, prompts, collation, the encoder cache, teacher transcripts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_pair, write_clips
from slimwhisper.data import Sample, SkipReport, load_sample_audio, open_dataset
from slimwhisper.errors import SlimWhisperError
from slimwhisper.recovery import FinetuneConfig, finetune
from slimwhisper.recovery.data import (
    EncoderCache,
    build_items,
    collate,
    fill_encoder_cache,
    hash_samples,
    make_labels,
    prefix_ids,
    text_decoder,
    weights_fingerprint,
)
from slimwhisper.recovery.losses import IGNORE_INDEX

FAST = dict(steps=4, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2, lr=1e-3)


def test_make_labels_masks_prefix_and_appends_eot():
    inputs, labels = make_labels([50, 51, 52], [7, 8], eot=1, max_tokens=10)
    assert inputs == [50, 51, 52, 7, 8]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 1]  # position i predicts inputs[i + 1], last predicts EOT
    inputs, labels = make_labels([50, 51], [7, 8, 9, 10], eot=1, max_tokens=4)
    assert inputs == [50, 51, 7, 8] and labels == [IGNORE_INDEX, 7, 8, 1]


def test_prefix_english_and_multilingual(english):
    model, processor = english
    tok = processor.tokenizer
    assert prefix_ids(model, None) == tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    multi, mproc = tiny_pair(True)
    mt = mproc.tokenizer
    assert prefix_ids(multi, "de") == mt.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"])
    with pytest.raises(SlimWhisperError, match="language"):
        prefix_ids(multi, None)


def test_collate_pads_inputs_and_masks_labels(english, tmp_path):
    model, processor = english
    manifest = write_clips(tmp_path / "d", n=2)
    pairs = hash_samples(open_dataset(manifest), SkipReport())
    items = build_items(pairs, model, processor.tokenizer, {pairs[0][1]: "a", pairs[1][1]: "abcd"}, None, 64)
    inputs, labels = collate(items, pad_id=99)
    assert inputs.shape == labels.shape == (2, 2 + 5)  # prefix 2 + " abcd" (5 byte tokens)
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert inputs[0, 4:].eq(99).all() and labels[0, 4:].eq(IGNORE_INDEX).all()  # " a" = 2 tokens, then padding
    assert labels[0, 0] == IGNORE_INDEX and labels[0, 3] == eot and labels[1, -1] == eot


def test_encoder_cache_hit_miss_and_fp16(english, tmp_path):
    model, processor = english
    manifest = write_clips(tmp_path / "d", n=3)
    items = build_items(hash_samples(open_dataset(manifest), SkipReport()), model, processor.tokenizer, None, None, 64)
    cache = EncoderCache(tmp_path / "c", weights_fingerprint(model.get_encoder()))
    assert fill_encoder_cache(model, processor.feature_extractor, items, cache, progress=False) == 3
    assert fill_encoder_cache(model, processor.feature_extractor, items, cache, progress=False) == 0  # all hits
    stored = cache.get(items[0].audio_hash)
    assert stored.dtype == torch.float16 and stored.shape == (1500, 32)
    feats = processor.feature_extractor([np.zeros(1)], sampling_rate=16_000, return_tensors="pt").input_features
    assert feats.shape[-1] == 3000
    audio = load_sample_audio(items[0].sample)
    direct = model.get_encoder()(processor.feature_extractor([audio], sampling_rate=16_000, return_tensors="pt")
                                 .input_features).last_hidden_state[0]
    torch.testing.assert_close(stored.float(), direct, atol=5e-3, rtol=1e-3)
    other, _ = tiny_pair(False, seed=1)  # other encoder weights: another key, so a miss
    assert weights_fingerprint(other.get_encoder()) != cache.fingerprint
    assert weights_fingerprint(tiny_pair(False, seed=0)[0].get_encoder()) == cache.fingerprint


def test_sample_language_from_config_for_multilingual(tmp_path):
    multi, processor = tiny_pair(True)
    sample = Sample("x", tmp_path / "x.wav", "hallo", language=None)
    items = build_items([(sample, "h")], multi, processor.tokenizer, None, "de", 64)
    assert items[0].input_ids[1] == processor.tokenizer.convert_tokens_to_ids("<|de|>")


def test_label_free_trains_on_cached_teacher_transcripts(slim, tmp_path, monkeypatch):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=2)
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "batch_size": 2, "label_free": True})
    finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c", progress=False)
    files = list((tmp_path / "c" / "transcripts").glob("*.json"))
    assert [f.name for f in files] == [f"{weights_fingerprint(original)}-engine.json"]  # one file per teacher
    texts = json.loads(files[0].read_text())
    # each clip's key maps to the teacher's own transcript of it
    pairs = hash_samples(open_dataset(manifest), SkipReport())
    decode = text_decoder(original, processor)
    assert texts == dict(zip([key for _, key in pairs], decode([load_sample_audio(s) for s, _ in pairs], "en")))
    import slimwhisper.recovery.data as data_module

    def no_generation(*args, **kwargs):  # the second run must read the cache, not decode again
        raise AssertionError("teacher transcripts were recomputed")

    monkeypatch.setattr(data_module, "text_decoder", no_generation)
    finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c", progress=False)


def test_normalised_references_are_recognised():
    from slimwhisper.recovery.data import looks_normalised

    assert looks_normalised(["i am from the cutter", "don't cry he said", "HELLO WORLD"])
    assert not looks_normalised(["I am from the cutter.", "Don't cry, he said.", "Hello world!"])
    assert not looks_normalised(["", "  "])  # nothing to judge


def test_encoder_cache_sweeps_only_stale_temporary_files(tmp_path):
    """A killed write leaves `key.tmp-*`; a later cache removes it once it is old, never a fresh one or an entry."""
    import os
    import time

    from slimwhisper.recovery.data import STALE_TMP_SECONDS, EncoderCache

    cache = EncoderCache(tmp_path, "fp")
    cache.put("abcd", torch.ones(2, 3))
    stale, fresh = cache.dir / "ab" / "abcd.tmp-11111111", cache.dir / "ab" / "abce.tmp-22222222"
    stale.write_bytes(b"half"), fresh.write_bytes(b"half")
    old = time.time() - STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))
    EncoderCache(tmp_path, "fp")
    assert not stale.exists() and fresh.exists() and cache.has("abcd")
