"""bench/e2e.py: `bench e2e` on a saved tiny model, every system and the opt-in compiled one."""
from __future__ import annotations

import json

import pytest
import torch

import slimwhisper as sw
from conftest import tiny_pair, write_clips
from slimwhisper.audio import load_audio
from slimwhisper.cli import main
from slimwhisper.errors import SlimWhisperError
from slimwhisper.eval.metrics import corpus_wer


def test_bench_e2e_cli_reports_every_system(tmp_path, capsys):
    """`bench e2e` on a saved tiny model: the JSON keys the owner checks; faster-whisper is skipped with a reason
    (the model was not read from CTranslate2 files); the fp32 engine and generate agree on every transcript."""
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    manifest = write_clips(tmp_path / "d", n=3)
    out = tmp_path / "e2e"
    argv = ["bench", "e2e", "--model", str(tmp_path / "m"), "--data", str(manifest), "--batch", "2", "--json",
            "--out", str(out), "--per-token-rounds", "3"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "result.json").read_text())
    rtf, wer = printed["rtf"], printed["wer"]
    assert {"slimwhisper", "hf_generate", "faster_whisper_int8"} <= set(rtf) and set(rtf) == set(wer)
    for system in ("slimwhisper", "slimwhisper_fp32", "hf_generate"):  # rtf = wall time / audio time
        details = printed["details"][system]
        assert rtf[system] == pytest.approx(details["wall_s"] / printed["audio_seconds"]), system
        assert details["ms_per_output_token"] == pytest.approx(1000 * details["wall_s"] / details["output_tokens"])
    # the fp32 engine's WER is the corpus WER of what a Transcriber gives on the same clips
    audios = [load_audio(tmp_path / "d" / f"c{i}.wav") for i in range(3)]
    texts = [r.text for r in sw.Transcriber(model, processor, batch_size=2).transcribe(audios)]
    assert wer["slimwhisper_fp32"] == pytest.approx(corpus_wer([f"clip {i} says hi" for i in range(3)], texts, "en"))
    assert rtf["faster_whisper_int8"] is None and "CTranslate2" in printed["details"]["faster_whisper_int8"]["skipped"]
    assert wer["slimwhisper_fp32"] == wer["hf_generate"]
    assert printed["details"]["slimwhisper"]["engine"]["quantize"] == "int8"
    assert printed["details"]["slimwhisper"]["engine"]["kv_cache"] == "float"
    assert printed["audio_seconds"] == pytest.approx(3 * 0.6, rel=1e-3)
    # decoder-only per-token figures: the fp32 engine and generate decode the same tokens from the same encoder
    # outputs, so their token counts agree exactly (a miscount of generate's output would show here)
    assert set(printed["per_token"]) == {"batch_2", "batch_1"}
    for figures in printed["per_token"].values():
        assert set(figures["ms_per_token"]) == {"slimwhisper", "slimwhisper_fp32", "hf_generate"}
        ms = figures["ms_per_token"]
        for system, value in ms.items():  # the fastest round's time per generated token
            assert value == pytest.approx(1000 * figures["decode_s"][system] / figures["tokens"][system]), system
        assert figures["tokens"]["slimwhisper_fp32"] == figures["tokens"]["hf_generate"] > 0
        assert figures["speedup_vs_hf_generate"]["slimwhisper"] == pytest.approx(ms["hf_generate"] / ms["slimwhisper"])
        assert figures["rounds"] == 3 and all(len(r) == 3 for r in figures["rounds_s"].values())
        assert figures["decode_s"]["hf_generate"] == pytest.approx(min(figures["rounds_s"]["hf_generate"]), abs=1e-3)


def test_bench_e2e_int8_cache_is_the_offered_engines_only(tmp_path, capsys):
    """--kv-cache int8 runs the offered engine ("slimwhisper") with the int8 cache; the fp32 engine keeps the
    float cache."""
    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    manifest = write_clips(tmp_path / "d", n=2)
    argv = ["bench", "e2e", "--model", str(tmp_path / "m"), "--data", str(manifest), "--batch", "2", "--json",
            "--out", str(tmp_path / "e2e"), "--systems", "slimwhisper", "slimwhisper_fp32", "--no-per-token",
            "--kv-cache", "int8"]
    assert main(argv) == 0
    details = json.loads(capsys.readouterr().out)["details"]
    assert details["slimwhisper"]["engine"]["kv_cache"] == "int8"
    assert details["slimwhisper_fp32"]["engine"]["kv_cache"] == "float"


def test_bench_e2e_compiled_system_is_opt_in_and_reports_compile_time(tmp_path, capsys, monkeypatch):
    """`slimwhisper_compiled` is accepted but not run by default; it asks torch.compile for the encoder only
    (stubbed here, so CI does not compile), runs unquantised (the engine refuses compile with int8), and, the
    stub being the identity, transcribes exactly like `slimwhisper_fp32`."""
    from slimwhisper.bench import e2e
    from slimwhisper.loading.processor import save_processor

    compiled: list = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model, processor = tiny_pair(False)
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    manifest = write_clips(tmp_path / "d", n=3)
    assert "slimwhisper_compiled" not in e2e.SYSTEMS
    argv = ["bench", "e2e", "--model", str(tmp_path / "m"), "--data", str(manifest), "--batch", "2", "--json",
            "--systems", "slimwhisper_fp32", "slimwhisper_compiled", "--no-per-token"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [getattr(fn, "__name__", None) for fn in compiled] == ["encode"]
    assert set(printed["rtf"]) == set(printed["wer"]) == {"slimwhisper_fp32", "slimwhisper_compiled"}
    assert printed["per_token"] is None
    assert printed["wer"]["slimwhisper_compiled"] == printed["wer"]["slimwhisper_fp32"]
    details = printed["details"]["slimwhisper_compiled"]
    assert {"wall_s", "output_tokens", "ms_per_output_token", "engine", "compile_s", "compiled",
            "graphs_compiled_while_timed", "graph_breaks"} <= set(details)
    assert details["compiled"] == "encoder" and details["engine"]["quantize"] is None
    assert details["compile_s"] == details["engine"]["warmup_s"] > 0 and details["graphs_compiled_while_timed"] == 0
    assert details["graph_breaks"] == 0  # the stub compiles nothing
    assert details["output_tokens"] == printed["details"]["slimwhisper_fp32"]["output_tokens"]
    assert printed["rtf"]["slimwhisper_compiled"] == pytest.approx(details["wall_s"] / printed["audio_seconds"])
    with pytest.raises(SlimWhisperError, match="unquantised"):
        sw.Transcriber(model, processor, quantize="int8", compile=True)
    assert e2e._batch_sizes([torch.zeros(16000 * 31).numpy(), torch.zeros(100).numpy()], 2) == [2, 1]
