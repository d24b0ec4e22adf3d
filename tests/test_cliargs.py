"""cliargs.py: the model first or as --model in every command, one --batch flag, one quiet flag."""
from __future__ import annotations

import pytest

from slimwhisper.cli import build_parser, main
from slimwhisper.cliargs import resolve_model
from slimwhisper.errors import SlimWhisperError

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
    parser = build_parser()
    for command, rest in EVERY_COMMAND:
        args = parser.parse_args([*command, "tiny.en", *rest])
        if hasattr(args, "batch_size"):
            assert parser.parse_args([*command, "tiny.en", *rest, "--batch", "3"]).batch_size == 3
            assert parser.parse_args([*command, "tiny.en", *rest, "--batch-size", "3"]).batch_size == 3
    two = parser.parse_args(["info", "tiny.en", "--model", "base"])
    with pytest.raises(SlimWhisperError, match="two models"):
        resolve_model(two)
    code = main(["info", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "name a model first" in err
