"""Shared fixtures and helpers: tiny random Whisper models (fast, CPU), small audio sets, the shared real data.

Layout: tests/ mirrors src/slimwhisper/, one test module per source module under the same path:
tests/<subpackage>/test_<module>.py tests src/slimwhisper/<subpackage>/<module>.py and tests/test_<module>.py a
top-level module (tests/test_report.py tests benchmarks/report.py). A test lives in the module of the source module
it mainly tests; real-weight tests (marker `real`) too. tests/system/ holds the cross-cutting end-to-end tests (the
bad-input sweep, kill -9, multi-process runs, big geometries).

Helpers used by more than one test module live here and are imported with `from conftest import ...` (pytest puts
tests/ on sys.path). Every test folder is a package (give a new one an empty __init__.py), so same-named modules
such as mla/test_math.py and lowrank/test_math.py do not clash. Fixtures and helpers used by one folder only live in
that folder (its conftest.py; loading/ct2_writer.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

def benchmark_script(name: str):
    """The module of benchmarks/<name>.py (the scripts are not a package), so tests can call its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Special ids of the tiny vocabulary (an English-only layout, like tiny.en's).
EOT, SOT, PREV, NO_TS = 90, 91, 92, 93


def tiny_whisper(seed: int = 0, d_model: int = 64, heads: int = 4, layers: int = 2) -> WhisperForConditionalGeneration:
    """A random Whisper small enough for unit tests, with a generation config generate() accepts."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights make attention peaky, so errors are visible
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
        no_timestamps_token_id=NO_TS,
        prev_sot_token_id=PREV,
        is_multilingual=False,
        max_length=64,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return model


@pytest.fixture
def tiny_model() -> WhisperForConditionalGeneration:
    return tiny_whisper()


@pytest.fixture
def features() -> torch.Tensor:
    """Two random log-mel inputs [2, 80, 3000]."""
    torch.manual_seed(1)
    return torch.randn(2, 80, 3000) * 0.5


def byte_whisper_pair(
    config_kwargs: dict,
    langs: tuple[str, ...],
    multilingual: bool,
    *,
    seed: int = 0,
    timestamps: bool = False,
    **generation_kwargs,
):
    """A random Whisper of `config_kwargs` size with a byte-level tokenizer in Whisper's special-token layout.

    Returns (model, processor, ids): ids maps each control token to its id; the generation config
    carries the language and task maps when `multilingual`.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = WhisperTokenizer(vocab={ch: i for i, ch in enumerate(bytes_to_unicode().values())}, merges=[])
    control = ["<|endoftext|>", "<|startoftranscript|>", *([f"<|{x}|>" for x in langs] if multilingual else []),
               "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"]
    tok.add_tokens(control, special_tokens=True)
    if timestamps:
        tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in control}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, decoder_start_token_id=sot, **config_kwargs)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    gc = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                          no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
                          is_multilingual=multilingual, suppress_tokens=[], begin_suppress_tokens=[eot],
                          **generation_kwargs)
    if multilingual:
        gc.lang_to_id = {f"<|{x}|>": ids[f"<|{x}|>"] for x in langs}
        gc.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config = gc
    return model, WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok), ids


def tiny_pair(multilingual: bool = False, seed: int = 0):
    """A random 2-layer Whisper and a byte-level tokenizer with Whisper's control tokens."""
    size = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64)
    model, processor, _ = byte_whisper_pair(size, ("en", "de"), multilingual, seed=seed, max_length=24)
    return model, processor


def write_clips(folder: Path, n: int = 6, seconds: float = 0.6) -> Path:
    """n short noise-plus-tone clips and a manifest.jsonl naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        t = np.arange(int(16_000 * seconds)) / 16_000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"c{i}.wav", audio.astype(np.float32), 16_000)
        lines.append(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "text": f"clip {i} says hi", "lang": "en"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


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
    """The engine's greedy tokens (no timestamps) for `features`, EOT dropped."""
    from slimwhisper.engine.decode import DecoderRunner, greedy_decode
    from slimwhisper.tokens import TokenIds

    runner = DecoderRunner(model)
    ids = TokenIds.from_generation_config(model.generation_config)
    prompt = torch.tensor([[ids.sot, ids.no_timestamps]] * features.shape[0])
    return [d.tokens for d in greedy_decode(runner, runner.encode(features), prompt, ids)]


def generate_tokens(model, features: torch.Tensor) -> list[list[int]]:
    """`generate`'s greedy tokens for `features`, EOT dropped: the reference `engine_tokens` must equal."""
    out = model.generate(features, do_sample=False)
    return [[t for t in row.tolist() if t != EOT] for row in out]


REALSPEECH = SHARED_DATA / "realspeech" / "manifest.jsonl"
needs_realspeech = pytest.mark.skipif(not REALSPEECH.is_file(), reason=f"{REALSPEECH} not found")


def realspeech_audio(pick) -> list:
    """16 kHz arrays of the realspeech manifest rows that `pick(rows)` chooses, in its order."""
    from slimwhisper.audio import load_audio

    rows = [json.loads(line) for line in REALSPEECH.open()]
    return [load_audio(SHARED_DATA / "realspeech" / r["audio"]) for r in pick(rows)]


def tone(seconds: float, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_tone(path: Path, seconds: float = 0.5, rate: int = 16_000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels), rate)
    return path


def tiny_whisper_with_processor(multilingual: bool = True, seed: int = 0):
    """Random 2-layer Whisper plus a byte-level tokenizer with Whisper's special-token layout (en, de, zh)."""
    size = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=448)
    model, processor, _ = byte_whisper_pair(size, ("en", "de", "zh"), multilingual, seed=seed, timestamps=True,
                                            max_length=448, max_initial_timestamp_index=50)
    with torch.no_grad():  # constant logits favouring "a": short outputs, and long-form moves 30 s per window
        model.model.decoder.layer_norm.weight.zero_()
        a_id = processor.tokenizer.convert_tokens_to_ids("a")
        model.model.decoder.layer_norm.bias.copy_(model.proj_out.weight[a_id] * 50)
    return model, processor


def write_set(root: Path, rows: list[tuple[str, str, str | None, float]]) -> Path:
    """Audio (a quiet tone) + manifest.jsonl; rows are (id, text, lang, seconds)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for uid, text, lang, seconds in rows:
        t = np.arange(int(seconds * 16_000)) / 16_000
        sf.write(str(root / f"{uid}.flac"), (0.05 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16_000)
        lines.append(json.dumps({"id": uid, "audio": f"{uid}.flac", "text": text, "lang": lang}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


MIXED = [("e1", "Hello world", "en", 1.0), ("e2", "Good morning", "en", 0.6), ("d1", "Guten Tag", "de", 0.8),
         ("z1", "你好世界", "zh", 0.7), ("x1", "bonjour", "fr", 0.5)]


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


@pytest.fixture(scope="module")
def encoder_stats():
    """Low-rank calibration statistics of `tiny_whisper()`'s encoder on three random clips."""
    from slimwhisper.lowrank import calibrate

    return calibrate(tiny_whisper(), calib_audio(), progress=False)
