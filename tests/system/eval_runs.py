"""What the eval fault tests share: a tiny model folder, a manifest whose every utterance counts, an
uninterrupted reference run and the comparison of two finished runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from conftest import tiny_pair
from slimwhisper.cli import main
from slimwhisper.eval.report import comparable
from slimwhisper.loading.processor import save_processor

N_CLIPS = 8
# decode one utterance per batch, so the log grows line by line and a kill can land between any two
EVAL_ARGS = ["--batch-size", "1", "--engine", "generate", "--max-new-tokens", "6", "--quiet"]
FINISHED = ["summary.json", "summary.md", "utterances.jsonl"]


def save_tiny_model(folder: Path) -> Path:
    """conftest's random 2-layer English-only Whisper (byte-level tokenizer), saved as a model folder."""
    model, processor = tiny_pair(False)
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return folder


def write_manifest(folder: Path, n: int = N_CLIPS) -> Path:
    """n short clips whose references differ in length, so a lost or doubled utterance changes every count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        t = np.arange(int(16_000 * (0.3 + 0.05 * i))) / 16_000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"u{i}.wav", audio.astype(np.float32), 16_000)
        text = " ".join(["word"] * (i + 1)) + f" number {i}"
        lines.append(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "lang": "en"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def reference_run(model: Path, data: Path, out: Path) -> None:
    """An uninterrupted single-process run, in this process (no second start-up of torch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", str(model), "--data", str(data), "--out", str(out), *EVAL_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


def records(out: Path) -> list[dict]:
    """utterances.jsonl in order, without the per-utterance decoding time."""
    lines = (out / "utterances.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "decode_seconds"} for line in lines]


def assert_same_results(out: Path, ref: Path) -> None:
    """The same summary (timings aside), the same log in the same order, and nothing else left in the folder."""
    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert comparable(got) == comparable(want)
    assert got["n_utterances"] == N_CLIPS
    assert records(out) == records(ref)
    assert sorted(p.name for p in out.iterdir()) == FINISHED
