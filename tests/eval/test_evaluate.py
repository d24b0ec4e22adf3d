"""eval/evaluate.py: language groups and prompts, long clips, resume, baseline comparison, real weights."""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from conftest import MIXED, SHARED_DATA, tiny_whisper_with_processor, write_set
from slimwhisper.data import Sample, open_dataset
from slimwhisper.errors import SlimWhisperError
from slimwhisper.eval import evaluate

ev = importlib.import_module("slimwhisper.eval.evaluate")  # the package attribute `evaluate` is the function


def spy_generate(model, calls: list[dict]):
    """Record generate()'s keyword arguments while still running it."""
    original = model.generate

    def generate(**kwargs):
        seen = {k: v for k, v in kwargs.items() if k != "input_features"}
        calls.append(seen | {"batch": len(kwargs["input_features"])})
        return original(**kwargs)

    return SimpleNamespace(generate=generate, generation_config=model.generation_config, parameters=model.parameters,
                           state_dict=model.state_dict, to=model.to, eval=model.eval, config=model.config)


def test_evaluate_groups_by_language_and_prompts_each(tmp_path: Path, multi) -> None:
    model, proc = multi
    data = open_dataset(write_set(tmp_path / "data", MIXED))
    calls: list[dict] = []
    out = tmp_path / "out"
    res = evaluate(spy_generate(model, calls), proc, data, batch_size=4, out_dir=out, max_new_tokens=4,
                   tag="tiny-multi", progress=False, engine="generate")
    assert sorted(c.get("language") for c in calls) == ["de", "en", "zh"]
    assert all(c["task"] == "transcribe" and c["num_beams"] == 1 for c in calls)
    assert {r.language for r in res.languages} == {"de", "en", "zh"}
    assert res.overall.n_utterances == 4
    assert res.skipped.by_reason() == {"unsupported language": 1}  # fr is not in the tiny vocabulary
    summary = json.loads((out / "summary.json").read_text())
    for key in ("wer", "cer", "n_utterances", "n_words", "languages", "skipped", "settings"):
        assert key in summary
    assert summary["settings"]["engine"] == "generate"
    assert summary["languages"]["zh"]["primary"] == "cer"
    assert summary["timing"]["model"]["audio_seconds"] == pytest.approx(1.0 + 0.6 + 0.8 + 0.7, abs=0.01)
    assert summary["n_words"] == 2 + 2 + 2 + 4  # zh is split into characters
    lines = (out / "utterances.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4 and "_run" in json.loads(lines[0])
    recs = [json.loads(line) for line in lines[1:]]
    assert {"id", "model", "reference", "hypothesis", "word_errors", "n_words", "char_errors", "n_chars"} <= set(
        recs[0])
    # rtf: the logged decoding seconds over the audio seconds; the corpus rates pool the logged errors
    decode_seconds = sum(r["decode_seconds"] for r in recs)
    assert summary["timing"]["model"]["rtf"] == pytest.approx(decode_seconds / (1.0 + 0.6 + 0.8 + 0.7), abs=1e-3)
    assert summary["wer"] == pytest.approx(sum(r["word_errors"] for r in recs) / sum(r["n_words"] for r in recs))
    assert summary["cer"] == pytest.approx(sum(r["char_errors"] for r in recs) / sum(r["n_chars"] for r in recs))
    assert "| **all** |" in (out / "summary.md").read_text()


def test_english_only_models_get_no_language_prompt(tmp_path: Path, english_only) -> None:
    model, proc = english_only
    data = open_dataset(write_set(tmp_path / "data", MIXED))
    calls: list[dict] = []
    res = evaluate(spy_generate(model, calls), proc, data, out_dir=tmp_path / "o", max_new_tokens=3, progress=False,
                   num_beams=2, engine="generate")
    assert calls and all("language" not in c and "task" not in c and c["num_beams"] == 2 for c in calls)
    assert [r.language for r in res.languages] == ["en"]
    assert res.skipped.by_reason() == {"unsupported language": 3}


def test_long_clips_are_decoded_long_form_or_skipped(tmp_path: Path, multi) -> None:
    model, proc = multi
    data = open_dataset(write_set(tmp_path / "data", [("long", "a long one", "en", 31.0), ("s", "short", "en", 1.0)]))
    calls: list[dict] = []
    evaluate(spy_generate(model, calls), proc, data, out_dir=tmp_path / "a", max_new_tokens=3, progress=False,
             engine="generate")
    long_calls = [c for c in calls if c.get("return_timestamps")]
    assert len(long_calls) == 1 and "attention_mask" in long_calls[0] and len(calls) == 2
    recs = [json.loads(x) for x in (tmp_path / "a" / "utterances.jsonl").read_text().splitlines()[1:]]
    assert {r["id"]: r["long_form"] for r in recs} == {"long": True, "s": False}
    res = evaluate(model, proc, data, out_dir=tmp_path / "b", max_new_tokens=3, progress=False, long_audio="skip")
    assert res.skipped.by_reason() == {"too long": 1} and res.overall.n_utterances == 1


def test_evaluate_scores_what_the_engine_transcribes_by_default(tmp_path: Path, multi) -> None:
    """The default decoder is the engine as `transcribe` runs it: the same texts, and the summary says so."""
    from slimwhisper.assets import DEMO_DIR
    from slimwhisper.audio import load_audio
    from slimwhisper.engine import Transcriber

    model, proc = multi
    data = open_dataset(DEMO_DIR / "manifest.jsonl", limit=3)  # real (synthetic) speech: the detector hears it
    out = tmp_path / "out"
    evaluate(model, proc, data, out_dir=out, progress=False, max_new_tokens=5)
    assert json.loads((out / "summary.json").read_text())["settings"]["engine"] == "fast"
    hyps = {r["id"]: r["hypothesis"] for r in map(json.loads, (out / "utterances.jsonl").read_text().splitlines()[1:])}
    engine = Transcriber(model, proc, max_new_tokens=5)
    expected = {s.id: engine.transcribe(load_audio(s.audio), language="en").text for s in data.samples}
    assert hyps == expected and all(expected.values())


def test_resume_skips_done_utterances_and_refuses_other_settings(tmp_path: Path, multi, monkeypatch) -> None:
    model, proc = multi
    data = open_dataset(write_set(tmp_path / "data", MIXED[:4]))
    out = tmp_path / "out"
    evaluate(model, proc, data.samples[:2], out_dir=out, max_new_tokens=3, progress=False, tag="m")
    log = out / "utterances.jsonl"
    with log.open("a") as fh:
        fh.write('{"model": "model", "id": "tor')  # a run killed mid-line
    decoded: list[str] = []
    real = ev.text_decoder

    def counting(*args, **kwargs):
        decode = real(*args, **kwargs)
        return lambda audios, lang: decoded.extend([lang] * len(audios)) or decode(audios, lang)

    monkeypatch.setattr(ev, "text_decoder", counting)
    res = evaluate(model, proc, data.samples, out_dir=out, max_new_tokens=3, progress=False, tag="m")
    assert len(decoded) == 2 and res.overall.n_utterances == 4
    ids = [json.loads(x).get("id") for x in log.read_text().splitlines()[1:]]
    assert sorted(ids) == sorted(s.id for s in data.samples)
    with pytest.raises(SlimWhisperError, match="different run.*num_beams"):
        evaluate(model, proc, data.samples, out_dir=out, max_new_tokens=3, progress=False, tag="m", num_beams=2)
    other, _ = tiny_whisper_with_processor(True, seed=5)
    with pytest.raises(SlimWhisperError, match="different run"):
        evaluate(other, proc, data.samples, out_dir=out, max_new_tokens=3, progress=False, tag="m")
    with pytest.raises(SlimWhisperError, match="different run.*kv_cache"):  # the int8 cache is another run
        evaluate(model, proc, data.samples, out_dir=out, max_new_tokens=3, progress=False, tag="m", kv_cache="int8")
    res = evaluate(model, proc, data.samples, out_dir=tmp_path / "int8", max_new_tokens=3, progress=False, tag="m",
                   kv_cache="int8", quantize="int8")
    assert res.overall.n_utterances == 4
    settings = json.loads((tmp_path / "int8" / "summary.json").read_text())["settings"]
    assert settings["kv_cache"] == "int8" and settings["quantize"] == "int8"


def test_baseline_comparison_with_paired_bootstrap(tmp_path: Path, multi, monkeypatch) -> None:
    model, proc = multi
    other, _ = tiny_whisper_with_processor(True, seed=7)
    rows = [(f"u{i}", "the cat sat on the mat today", "en", 0.5) for i in range(30)]
    data = open_dataset(write_set(tmp_path / "data", rows))
    perfect = {id(model)}  # the model transcribes perfectly, the baseline drops the last word

    def fake(m, processor, **kwargs):
        text = "the cat sat on the mat today" if id(m) in perfect else "the cat sat on the mat"
        return lambda audios, lang: [text] * len(audios)

    monkeypatch.setattr(ev, "text_decoder", fake)
    res = evaluate(model, proc, data, out_dir=tmp_path / "o", baseline=(other, proc), tag="small", baseline_tag="orig",
                   n_bootstrap=1000, progress=False)
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["wer"] == 0 and s["baseline_wer"] == pytest.approx(1 / 7)
    assert s["delta_wer"] == pytest.approx(-1 / 7) and s["delta_wer_significant"] and s["delta_wer_mark"] == "✱"
    assert s["languages"]["en"]["delta_wer_ci"][1] < 0 and s["baseline"] == "orig"
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "ΔWER [95% CI]" in md and "✱" in md
    assert res.overall.delta_wer.delta == pytest.approx(-1 / 7)  # 1 word of 7 dropped by the baseline, everywhere
    # the same weights as their own baseline: no difference, not significant
    same = evaluate(model, proc, data, out_dir=tmp_path / "p", baseline=(model, proc), n_bootstrap=500, progress=False)
    assert same.overall.delta_wer.delta == 0 and same.overall.delta_wer.mark == "ns"


@pytest.fixture(scope="module")
def tiny_en():
    """The real tiny.en through slimwhisper.loading, or a skip saying what is missing."""
    loading = pytest.importorskip("slimwhisper.loading")
    if not hasattr(loading, "load") or not (SHARED_DATA / "realspeech" / "manifest.jsonl").is_file():
        pytest.skip("needs slimwhisper.loading.load and the shared realspeech clips")
    try:
        return loading.load("tiny.en")
    except SlimWhisperError as exc:
        pytest.skip(f"tiny.en weights are not installed: {exc}")


@pytest.mark.real
def test_real_tiny_en_on_realspeech(tmp_path: Path, tiny_en) -> None:
    model, proc = tiny_en
    data = open_dataset(SHARED_DATA / "realspeech" / "manifest.jsonl", keep_language="en")
    picks = [s for s in data if not s.id.startswith("en_lj_")][:3] + [s for s in data if s.id.startswith("en_lj_")][:2]
    started = time.perf_counter()
    res = evaluate(model, proc, picks, out_dir=tmp_path, batch_size=5, progress=False)
    assert res.overall.n_utterances == 5 and res.overall.n_words > 40
    assert 0.0 <= res.wer < 0.30, (tmp_path / "utterances.jsonl").read_text()
    assert time.perf_counter() - started < 60


@pytest.mark.real
def test_real_tiny_en_long_form_over_30_s(tmp_path: Path, tiny_en) -> None:
    from slimwhisper.audio import load_audio

    model, proc = tiny_en
    data = open_dataset(SHARED_DATA / "realspeech" / "manifest.jsonl", keep_language="en")
    clips = [s for s in data if s.id.startswith("en_lj_") and (s.duration or 0) > 7][:4]
    audio = np.concatenate([load_audio(s.audio) for s in clips])
    assert len(audio) > 31 * 16_000
    sf.write(str(tmp_path / "long.flac"), audio, 16_000)
    long = Sample("long", tmp_path / "long.flac", " ".join(s.text for s in clips), "en", len(audio) / 16_000)
    res = evaluate(model, proc, [long], out_dir=tmp_path / "out", progress=False)
    rec = json.loads((tmp_path / "out" / "utterances.jsonl").read_text().splitlines()[1])
    assert rec["long_form"] and res.overall.n_words > 60
    assert res.wer < 0.30, rec["hypothesis"]
