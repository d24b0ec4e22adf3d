"""Every command on random-weight models of the big geometries (small, medium, large-v3, large-v3-turbo).

Each model has one encoder and one decoder layer but the release's widths, heads, mel bins (128 for large-v3)
and vocabulary (51866 for large-v3), so shape and id mistakes show before anyone has the weights. Every
encoder pass costs a full 30-s window at the release's width, so each geometry's model is built once and each
step runs as few passes as it can.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import slimwhisper as sw
from slimwhisper.cli import main
from slimwhisper.geometry import GEOMETRIES, memory_plan, random_model, whisper_config

BIG = ("small", "medium", "large-v3", "large-v3-turbo")
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc2")
SR = 16_000


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """Two seconds of a tone with noise: enough for one calibration window."""
    t = np.arange(2 * SR) / SR
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    sf.write(path, wave.astype(np.float32), SR)
    return path


@pytest.fixture(scope="module", params=BIG)
def big(request, tmp_path_factory, clip) -> Iterator[dict]:
    """The geometry's random model folder, its loaded model and features, and its logits on one prompt.

    A geometry's folders take up to 2 GB (large-v3's embedding alone is 265 MB in fp32): they go as soon as
    its tests are done, so a run never holds more than one geometry on disk.
    """
    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder = random_model(name, root / "model", layers=1, seed=0)
    model, processor = sw.load(folder)
    audio, _ = sf.read(clip, dtype="float32")
    features = processor(audio, sampling_rate=SR, return_tensors="pt").input_features
    gc = model.generation_config
    prompt = torch.tensor([[gc.decoder_start_token_id, gc.lang_to_id["<|en|>"], gc.task_to_id["transcribe"],
                            gc.no_timestamps_token_id]])
    yield {"name": name, "root": root, "folder": folder, "model": model, "processor": processor,
           "features": features, "prompt": prompt, "logits": logits(model, features, prompt)}
    shutil.rmtree(root, ignore_errors=True)


def logits(model, features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_features=features, decoder_input_ids=prompt).logits


def run_cli(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def test_geometry_matches_the_release(big):
    d, heads, _, _, mels, vocab = GEOMETRIES[big["name"]]
    config, tokenizer = big["model"].config, big["processor"].tokenizer
    assert (config.d_model, config.encoder_attention_heads, config.num_mel_bins, config.vocab_size) == (
        d, heads, mels, vocab)
    assert len(tokenizer) == vocab and big["processor"].feature_extractor.feature_size == mels
    assert big["features"].shape == (1, mels, 3000)
    assert big["logits"].shape == (1, 4, vocab)
    gc = big["model"].generation_config
    assert gc.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>") == vocab - 1502
    assert len(gc.lang_to_id) == (100 if vocab == 51866 else 99)


def test_convert_all_mla_modules_at_full_rank_keeps_logits(big, clip):
    out = big["root"] / "mla"
    # joint factorisation needs no calibration pass: at full rank every factorisation is exact
    run_cli("convert", str(big["folder"]), "--modules", "decoder_self,decoder_cross,encoder_self",
            "--factorization", "joint", "--out", str(out), "--device", "cpu", "--quiet")
    slim, _ = sw.load(out)  # strict: every saved tensor has its place
    shutil.rmtree(out)  # loaded: the folder is no longer needed
    kinds = slim.config.compression["mla"]["layers"]
    assert len(kinds) == 3
    got = logits(slim, big["features"], big["prompt"])
    scale = big["logits"].abs().max()
    assert (got - big["logits"]).abs().max() <= 1e-3 * scale


def test_compress_encoder_save_load_and_lite_whisper(big, clip):
    out = big["root"] / "lowrank"
    # fc1 is left out: the eigendecomposition of its [4 d, 4 d] output covariance is the one step that costs
    # minutes at these widths on a CPU (`bench calibrate` covers fc1's statistics and their memory)
    run_cli("compress-encoder", str(big["folder"]), "--rank", "64", "--calibration", str(clip),
            "--calibration-limit", "1", "--out", str(out), "--device", "cpu", "--quiet", "--targets", *TARGETS)
    slim, processor = sw.load(out)
    d = big["model"].config.d_model
    ranks = slim.config.compression["lowrank"]["layers"]
    assert len(ranks) == len(TARGETS) and set(ranks.values()) == {64}
    fc2 = slim.model.encoder.layers[0].fc2
    assert fc2.down.weight.shape == (64, 4 * d) and fc2.up.weight.shape == (d, 64)
    stats = load_file(str(out / sw.lowrank.STATS_FILE))
    assert stats["model.encoder.layers.0.fc2.gram"].shape == (d, d)
    got = logits(slim, big["features"], big["prompt"])
    assert got.shape == big["logits"].shape and torch.isfinite(got).all()
    lite = big["root"] / "lite"
    sw.lowrank.save_lite_whisper(slim, lite)
    processor.save_pretrained(lite)
    back, _ = sw.load(lite)
    want = slim.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    shutil.rmtree(lite)
    big["lowrank"] = (slim, processor)


def test_engine_decodes_the_compressed_model(big, clip):
    from slimwhisper.engine import Transcriber

    slim, processor = big.get("lowrank") or (big["model"], big["processor"])
    audio, _ = sf.read(clip, dtype="float32")
    engine = Transcriber(slim, processor, batch_size=1, max_new_tokens=4, vad=False)
    (result,) = engine.transcribe([audio], language="en")
    assert isinstance(result.text, str) and result.language == "en"
    assert engine.stats["windows"] == 1 and 1 <= engine.stats["tokens"] <= 5


def test_bench_kv_geometry_equals_the_formula(big, capsys):
    name = big["name"]
    capsys.readouterr()
    run_cli("bench", "kv", "--geometry", name, "--budget-gib", "24", "--json")
    result = json.loads(capsys.readouterr().out)
    plan = memory_plan(whisper_config(name), tokens=448)
    fp16 = result["plans"]["original"]["fp16"]
    assert fp16["weight_bytes"] == plan.weight_bytes
    assert fp16["cache_bytes_per_sequence"] == plan.cache_bytes_per_sequence
    assert fp16["largest_batch"] == plan.largest_batch(24 * 2**30)
    compressed = result["plans"]["compressed"]["fp16"]
    assert compressed["cache_bytes_per_sequence"] < fp16["cache_bytes_per_sequence"]
