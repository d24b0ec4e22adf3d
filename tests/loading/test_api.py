"""loading/api.py: load() of CTranslate2, Hugging Face and lite-whisper directories, its cache and errors."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

import slimwhisper as sw
from conftest import SHARED_DATA, tiny_pair
from loading.ct2_writer import EOT, NO_TS, SOT, VOCAB, ct2_whisper, logits, state, write_ct2_dir
from slimwhisper.errors import ModelNotFoundError, SlimWhisperError
from slimwhisper.loading import api, cache, load, to_openai_whisper_checkpoint
from slimwhisper.loading.processor import english_normalizer_file, save_processor
from slimwhisper.loading.registry import resolve_short_name
from slimwhisper.lowrank import LowRankConfig, save_lite_whisper

REALSPEECH = SHARED_DATA / "realspeech"
REAL_CLIPS = ["en_jfk_inaugural_excerpt", "en_speechbrain_example1_harvard", "en_uberi_one_two_three"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fp16 CT2 dir loaded twice: the first load converts, the second hits the cache."""
    root = tmp_path_factory.mktemp("loading")
    original = ct2_whisper()
    ct2_dir = write_ct2_dir(root / "ct2", original, "float16")
    first = load(ct2_dir, cache_dir=root / "cache")
    second = load(str(ct2_dir), cache_dir=root / "cache")
    return {"root": root, "dir": ct2_dir, "original": original, "first": first, "second": second}


def test_load_ct2_dir_gives_a_ready_model(converted: dict) -> None:
    model, processor = converted["first"]
    assert isinstance(model, WhisperForConditionalGeneration) and not model.training
    assert model.dtype == torch.float32
    gc = model.generation_config
    assert (gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id, gc.bos_token_id) == (SOT, EOT, EOT, EOT)
    assert (gc.no_timestamps_token_id, gc.prev_sot_token_id, gc.max_length) == (NO_TS, 263, 64)
    assert gc.suppress_tokens == [1, 2, 258, 259] and gc.begin_suppress_tokens == [220, EOT]
    assert gc.alignment_heads == [[1, 0], [1, 2]] and gc.is_multilingual is False
    assert model.config.decoder_start_token_id == SOT and model.config.eos_token_id == EOT
    tok = processor.tokenizer
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|0.00|>") == NO_TS + 1
    assert tok.all_special_ids[-1] == NO_TS and tok.convert_ids_to_tokens(VOCAB - 1) == "<|30.00|>"
    assert processor.feature_extractor.feature_size == 80
    sha = hashlib.sha256((converted["dir"] / "model.bin").read_bytes()).hexdigest()
    assert model.config.slimwhisper_source == {"name": str(converted["dir"]), "sha256": sha, "format": "ctranslate2"}
    json.dumps(model.config.slimwhisper_source)


def test_generate_and_pipeline_run(converted: dict) -> None:
    from transformers import pipeline

    model, processor = converted["first"]
    audio = np.random.default_rng(0).standard_normal(16_000 * 2).astype(np.float32) * 0.1
    features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    tokens = model.generate(features, max_new_tokens=5)
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device="cpu")  # fmt: skip
    out = asr(audio, generate_kwargs={"num_beams": 1, "max_new_tokens": 5})
    assert out["text"].strip() == processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


def test_second_load_comes_from_cache_and_is_identical(converted: dict) -> None:
    entries = list((converted["root"] / "cache" / "converted").iterdir())
    assert len(entries) == 1 and (entries[0] / cache.MARKER).is_file() and (entries[0] / "model.safetensors").is_file()
    (m1, p1), (m2, p2) = converted["first"], converted["second"]
    s1, s2 = state(m1), state(m2)
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1.generation_config.to_dict() == m2.generation_config.to_dict()
    assert m2.config.slimwhisper_source == m1.config.slimwhisper_source
    assert p1.tokenizer.get_vocab() == p2.tokenizer.get_vocab()
    assert p1.tokenizer.all_special_ids == p2.tokenizer.all_special_ids
    has_table = english_normalizer_file() is not None  # openai-whisper's spelling table, when installed
    assert (p1.tokenizer.english_spelling_normalizer is not None) == has_table
    assert (p2.tokenizer.english_spelling_normalizer is not None) == has_table
    torch.testing.assert_close(logits(m2), logits(m1), atol=1e-5, rtol=0)


def test_cache_hit_does_not_convert(converted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "convert_ct2", lambda files: pytest.fail("converted again instead of using the cache"))
    model, _ = load(converted["dir"], cache_dir=converted["root"] / "cache", dtype="float16")
    assert model.dtype == torch.float16


def test_hf_directory_round_trip(converted: dict, tmp_path: Path) -> None:
    model, processor = converted["first"]
    model.save_pretrained(tmp_path / "hf")
    save_processor(processor, tmp_path / "hf")
    again, proc = load(tmp_path / "hf", cache_dir=tmp_path / "cache")
    assert torch.equal(again.model.encoder.conv1.weight, model.model.encoder.conv1.weight)
    assert again.generation_config.no_timestamps_token_id == NO_TS and len(proc.tokenizer) == VOCAB
    # a directory slimwhisper saved keeps naming the original it came from (teacher, control, peers)
    assert again.config.slimwhisper_source == model.config.slimwhisper_source
    # a plain HF directory names no original: what was read is recorded
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("slimwhisper_source")
    config_path.write_text(json.dumps(config))
    plain, _ = load(tmp_path / "hf", cache_dir=tmp_path / "cache")
    weights = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert plain.config.slimwhisper_source == {"name": str(tmp_path / "hf"), "sha256": weights, "format": "huggingface"}


def test_hf_directory_without_generation_config(converted: dict, tmp_path: Path) -> None:
    """Checkpoints saved without generation_config.json get one rebuilt from the tokenizer."""
    model, processor = converted["first"]
    model.save_pretrained(tmp_path / "hf")
    save_processor(processor, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    again, _ = load(tmp_path / "hf", cache_dir=tmp_path / "cache")
    gc = again.generation_config
    assert (gc.decoder_start_token_id, gc.eos_token_id, gc.no_timestamps_token_id) == (SOT, EOT, NO_TS)
    assert gc.suppress_tokens == [1, 2, 258, 259] and gc.begin_suppress_tokens == [220, EOT]


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    directory = write_ct2_dir(tmp_path / "ct2", ct2_whisper(), "float16")
    first, _ = load(directory, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "converted").iterdir()
    (entry / "model.safetensors").unlink()
    again, _ = load(directory, cache_dir=tmp_path / "cache")
    assert (entry / "model.safetensors").is_file()
    assert torch.equal(again.model.decoder.embed_tokens.weight, first.model.decoder.embed_tokens.weight)


def test_missing_directory() -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load("/nonexistent/whisper-dir")


def test_truncated_model_bin(tmp_path: Path) -> None:
    directory = write_ct2_dir(tmp_path, ct2_whisper(), "float16")
    blob = (directory / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SlimWhisperError, match=r"truncated or corrupt: reading the data of .* Reinstall"):
        load(directory, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither model.bin"):
        load(tmp_path)


def test_unknown_short_name_lists_known_names() -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'tiny'.*base, tiny\.en"):
        load("tiny")


def test_hub_id_offline_lists_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"openai/whisper-tiny.*'base'.*'tiny\.en'.*CTranslate2"):
        load("openai/whisper-tiny")


def test_bad_dtype(converted: dict) -> None:
    with pytest.raises(SlimWhisperError, match="unknown dtype"):
        load(converted["dir"], cache_dir=converted["root"] / "cache", dtype="int3")


@pytest.fixture(scope="module")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Real models converted into a fresh cache once per module: name -> (model, processor, seconds).

    Greedy decoding is a long chain of small matmuls; on a busy 2-core machine one thread runs it
    2-3x faster than two that keep waiting for each other, so the real tests use one.
    """
    if not (REALSPEECH / "manifest.jsonl").is_file():
        pytest.skip(f"{REALSPEECH} not found")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"cache": tmp_path_factory.mktemp("real-cache")}
    torch.set_num_threads(threads)


def _real_model(real_models: dict, name: str) -> tuple:
    if name not in real_models:
        try:
            resolve_short_name(name)
        except ModelNotFoundError as exc:
            pytest.skip(str(exc))
        started = time.perf_counter()
        model, processor = load(name, cache_dir=real_models["cache"])
        real_models[name] = (model, processor, time.perf_counter() - started)
    return real_models[name]


def _clip(clip_id: str) -> np.ndarray:
    from slimwhisper.audio import load_audio

    entries = [json.loads(line) for line in (REALSPEECH / "manifest.jsonl").read_text().splitlines() if line]
    entry = next(e for e in entries if e["id"] == clip_id)
    return load_audio(REALSPEECH / entry["audio"])


@pytest.mark.real
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_real_greedy_tokens_equal_openai_whisper(
    name: str, real_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whisper = pytest.importorskip("whisper")
    model, processor, first_s = _real_model(real_models, name)
    reference = whisper.load_model(str(to_openai_whisper_checkpoint(model, tmp_path / f"{name}.pt")), device="cpu")
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lang = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    for clip_id in REAL_CLIPS:
        audio = _clip(clip_id)
        features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.inference_mode():
            ours = [t for t in model.generate(features, **lang)[0].tolist() if t < eot]
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels=reference.dims.n_mels)
        options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True)
        theirs = whisper.decode(reference, mel, options)
        assert ours == theirs.tokens, (clip_id, processor.tokenizer.decode(ours), theirs.text)
        assert len(ours) > 3

    monkeypatch.setattr(api, "convert_ct2", lambda files: pytest.fail("second load converted again"))
    started = time.perf_counter()
    again, _ = load(name, cache_dir=real_models["cache"])
    cached_s = time.perf_counter() - started
    s1, s2 = state(model), state(again)
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert again.config.slimwhisper_source == model.config.slimwhisper_source
    assert again.generation_config.to_dict() == model.generation_config.to_dict()
    print(f"{name}: first load {first_s:.2f} s, cached load {cached_s:.2f} s")


@pytest.mark.real
def test_real_pipeline_equals_generate(real_models: dict) -> None:
    from transformers import pipeline

    model, processor, _ = _real_model(real_models, "tiny.en")
    audio = _clip("en_speechbrain_example1_harvard")
    features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        text = processor.batch_decode(model.generate(features), skip_special_tokens=True)[0]
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device="cpu")  # fmt: skip
    assert asr(audio, generate_kwargs={"num_beams": 1})["text"].strip() == text.strip()
    assert "birch canoe" in text


def test_lite_whisper_directory_loads_and_describes(tmp_path, capsys):
    """`slimwhisper.load` and `slimwhisper info` read a lite-whisper directory (its model_type is not an HF one)."""
    from slimwhisper.cli import main
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    audio = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1]
    slim = sw.convert(model, LowRankConfig(rank=8, granule=8), calibration=audio, progress=False)
    save_lite_whisper(slim, tmp_path / "lite")
    save_processor(processor, tmp_path / "lite")
    loaded, _ = sw.load(tmp_path / "lite")
    assert loaded.config.compression["lowrank"]["layers"] == slim.config.compression["lowrank"]["layers"]
    features = torch.randn(1, 80, 3000)
    torch.testing.assert_close(loaded.generate(features, max_new_tokens=4), slim.generate(features, max_new_tokens=4))
    assert main(["info", str(tmp_path / "lite"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lowrank"]["ranks"] == slim.config.compression["lowrank"]["layers"]
