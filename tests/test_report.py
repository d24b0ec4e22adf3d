"""benchmarks/report.py: BENCHMARKS.md is exactly what the stored results give, and every kind renders."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
report = benchmark_script("report")


def test_benchmarks_md_and_readme_are_rebuilt_from_the_results_unchanged():
    assert report.main(["--check"]) == 0, "run `make benchmarks` after changing benchmarks/results/"


def test_every_result_names_its_command_and_machine():
    found = report.results()
    # every stored result folder is read once, under the kind its name starts with ("table" otherwise)
    stored = sorted(p.parent.name for p in (ROOT / "benchmarks" / "results").glob("*/result.json"))
    assert stored and sorted(name for entries in found.values() for name, _ in entries) == stored
    for kind, entries in found.items():
        assert all(name.startswith(kind + "-") or kind == "table" for name, _ in entries), kind
    for entries in found.values():
        for name, result in entries:
            assert result.get("command") and result.get("machine", {}).get("cpu"), name
            assert "`slimwhisper " in report.provenance(result) or "`python " in report.provenance(result)


def test_renderers_make_tables_from_each_kind_of_result():
    meta = {"command": "/x/bin/slimwhisper bench kv tiny.en", "machine": {"cpu": "cpu"}, "versions": {}}
    kv = {**meta, "dtype": "float16", "budget_bytes": 2**30, "budget_length": 448,
          "models": {"model": {"self_bytes_per_token": 6144, "cross_bytes_per_frame": 6144,
                               "max_batch_in_budget": {"self": 390, "self_cross": 87}}}}
    text = report.render_kv("kv-x", kv)
    assert "| `model` | 6144 | 6144 | 390 | 87 |" in text
    assert report.command(kv) == "slimwhisper bench kv tiny.en"
    e2e = {"rtf": {"slimwhisper": 0.05, "faster_whisper_int8": 0.1}, "wer": {"slimwhisper": 0.07,
           "faster_whisper_int8": 0.07}, "utterances": 3, "audio_seconds": 30.0, "per_token": None}
    assert "| `slimwhisper` | 0.050 | 0.50x | 7.00 |" in report.render_e2e("e2e-x", e2e)
    longform = {**e2e, "rtf": {"slimwhisper": 0.02, "faster_whisper_batched_int8": 0.04}, "audio_seconds": 300.0}
    block = report.update_readme(f"a\n{report.README_START}\nold\n{report.README_END}\nb",
                                 {"longform": [("longform-x", longform)]})
    assert "old" not in block and "| longform-x | 300 s | n/a | 7.00 | n/a | n/a | 0.50x | n/a |" in block
    assert json.dumps(e2e)  # inputs stay plain JSON
