"""data/hf_disk.py: a saved Hugging Face dataset, its audio written once to the cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_tone
from slimwhisper.data import open_dataset


def test_hf_saved_dataset_writes_audio_once_to_the_cache(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    paths = [str(write_tone(tmp_path / "src" / f"{i}.flac", seconds=0.25 * (i + 1))) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"audio": paths, "sentence": ["one", "two", "three"], "locale": ["en", "de", "zh-CN"], "id": ["a", "b", "c"]}
    ).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": ds, "train": ds}).save_to_disk(str(tmp_path / "hf"))
    cache = tmp_path / "cache"
    out = open_dataset(tmp_path / "hf", cache_dir=cache)
    assert out.layout == "hf_disk"
    assert [(s.id, s.text, s.language) for s in out] == [("a", "one", "en"), ("b", "two", "de"), ("c", "three", "zh")]
    assert all(s.audio.is_relative_to(cache) and s.audio.suffix == ".flac" for s in out)
    assert out.samples[2].duration == pytest.approx(0.75)
    mtimes = [s.audio.stat().st_mtime_ns for s in out]
    again = open_dataset(tmp_path / "hf", cache_dir=cache, split="train")
    assert [(s.id, s.text) for s in again] == [("a", "one"), ("b", "two"), ("c", "three")]  # the train split
    assert [s.audio.stat().st_mtime_ns for s in open_dataset(tmp_path / "hf", cache_dir=cache)] == mtimes
