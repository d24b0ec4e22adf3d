"""`slimwhisper eval`: summary files, language filter, user errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MIXED, write_set
from slimwhisper.errors import SlimWhisperError
from slimwhisper.eval import cli


def parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_cli_writes_summary_and_filters_language(tmp_path: Path, multi, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_load", lambda name, device, dtype: multi)
    manifest = write_set(tmp_path / "data", MIXED[:4])
    out = tmp_path / "out"
    args = parse(["tiny", "--data", str(manifest), "--baseline", "tiny", "--language", "en", "--limit", "1",
                  "--out", str(out), "--max-new-tokens", "3", "--bootstrap", "200", "--no-progress"])
    assert cli.run(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_utterances"] == 1 and list(s["languages"]) == ["en"] and s["model"] == "tiny"
    # the baseline is the same model: no difference, and not a significant one
    assert s["delta_wer"] == 0 and s["delta_wer_ci"] == [0, 0] and s["delta_wer_significant"] is False
    assert "| **all** |" in capsys.readouterr().out
    assert cli.main(["eval", "tiny", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SlimWhisperError, match="no usable samples in language 'ru'"):
        cli.run(parse(["tiny", "--data", str(manifest), "--language", "ru", "--out", str(out)]))
