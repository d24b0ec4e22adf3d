"""data/readers.py: every layout reader, layout detection, skip reporting and language options."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import write_tone
from slimwhisper.data import Sample, detect_layout, load_sample_audio, open_dataset
from slimwhisper.errors import AudioError, SlimWhisperError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_librispeech_tree_reads_transcripts_and_reports_missing_audio(tmp_path: Path) -> None:
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    write_tone(chapter / "1089-134686-0000.flac")
    write_tone(chapter / "1089-134686-0001.flac", seconds=1.0)
    (chapter / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HE HOPED THERE WOULD BE STEW\n1089-134686-0001 STUFF IT INTO YOU\n"
        "1089-134686-0002 THIS ONE HAS NO AUDIO\n"
    )
    ds = open_dataset(tmp_path)
    assert ds.layout == "librispeech"
    assert [s.id for s in ds] == ["1089-134686-0000", "1089-134686-0001"]
    assert ds.samples[0].text == "HE HOPED THERE WOULD BE STEW"
    assert ds.samples[1].language == "en"
    assert ds.samples[1].duration == pytest.approx(1.0)
    assert ds.report.by_reason() == {"missing": 1}
    assert ds.report.items[0].id == "1089-134686-0002"


def test_jsonl_manifest_relative_paths_and_every_kind_of_bad_entry(tmp_path: Path) -> None:
    write_tone(tmp_path / "a" / "good.flac")
    write_tone(tmp_path / "stereo.wav", rate=44_100, channels=2)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16_000)
    (tmp_path / "junk.flac").write_bytes(b"not audio at all" * 10)
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"id": "u1", "audio": "a/good.flac", "text": " Hello there ", "lang": "en-US", "duration": 0.5},
        {"id": "u2", "audio": "stereo.wav", "text": "stereo", "language": "DE"},
        {"id": "u3", "audio": "empty.wav", "text": "x"},
        {"id": "u4", "audio": "junk.flac", "text": "x"},
        {"id": "u5", "audio": "nowhere.flac", "text": "x"},
        {"id": "u1", "audio": "a/good.flac", "text": "again"},
        {"id": "u6", "text": "no audio key"},
        {"id": "u7", "audio": "a/good.flac"},
        "{not json",
    ])
    ds = open_dataset(manifest)
    assert ds.layout == "jsonl"
    assert [s.id for s in ds] == ["u1", "u2"]
    assert ds.samples[0] == Sample("u1", tmp_path / "a" / "good.flac", "Hello there", "en", pytest.approx(0.5))
    assert ds.samples[1].language == "de"
    assert ds.report.by_reason() == {
        "bad manifest line": 1, "duplicate id": 1, "empty": 1, "missing": 1, "no audio field": 1, "no text": 1,
        "unreadable": 1,
    }
    assert "skipped 7 utterances" in ds.report.describe()
    # the folder is detected too, and the stereo 44.1 kHz file comes out 16 kHz mono
    assert open_dataset(tmp_path).layout == "jsonl"
    audio = load_sample_audio(ds.samples[1])
    assert audio.ndim == 1 and audio.dtype == np.float32 and len(audio) == pytest.approx(8000, abs=2)


def test_strict_mode_raises_on_the_first_bad_entry(tmp_path: Path) -> None:
    write_tone(tmp_path / "ok.flac")
    rows = [{"audio": "ok.flac", "text": "a"}, {"audio": "gone.flac", "text": "b"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(AudioError, match="gone.flac"):
        open_dataset(manifest, on_error="raise")


def test_common_voice_folder_uses_locale_or_folder_name(tmp_path: Path) -> None:
    lang_dir = tmp_path / "cv-corpus-17.0" / "de"
    write_tone(lang_dir / "clips" / "common_voice_de_1.mp3")
    write_tone(lang_dir / "clips" / "common_voice_de_2.wav")
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
    (lang_dir / "test.tsv").write_text(
        header + 'abc\tcommon_voice_de_1.mp3\tEin "Satz".\t2\t0\t\t\t\tde\t\n'
        "def\tcommon_voice_de_2.wav\tNoch einer\t2\t0\t\t\t\t\t\n"
    )
    (lang_dir / "dev.tsv").write_text(header + "abc\tcommon_voice_de_2.wav\tDev\t2\t0\t\t\t\tde\t\n")
    ds = open_dataset(lang_dir)
    assert ds.layout == "commonvoice"
    assert [(s.id, s.text, s.language) for s in ds] == [
        ("common_voice_de_1", 'Ein "Satz".', "de"), ("common_voice_de_2", "Noch einer", "de")]
    assert [s.text for s in open_dataset(lang_dir, split="dev")] == ["Dev"]
    assert [s.id for s in open_dataset(lang_dir / "test.tsv")] == ["common_voice_de_1", "common_voice_de_2"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(SlimWhisperError, match="Common Voice"):
        open_dataset(bad)


def test_audio_folder_with_metadata_csv(tmp_path: Path) -> None:
    write_tone(tmp_path / "clips" / "one.wav")
    write_tone(tmp_path / "clips" / "two.flac")
    (tmp_path / "metadata.csv").write_text(
        'file_name,transcription,language\nclips/one.wav,"Hello, world",en\nclips/two.flac,Bonjour,fr\n'
    )
    ds = open_dataset(tmp_path, language="es")
    assert ds.layout == "audiofolder"
    assert [(s.id, s.text, s.language) for s in ds] == [("clips/one.wav", "Hello, world", "en"),
                                                      ("clips/two.flac", "Bonjour", "fr")]
    (tmp_path / "metadata.csv").write_text("name,words\nclips/one.wav,hi\n")
    with pytest.raises(SlimWhisperError, match="audio column"):
        open_dataset(tmp_path)


def test_language_option_fills_only_unlabelled_samples(tmp_path: Path) -> None:
    write_tone(tmp_path / "x.flac")
    m = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "x.flac", "text": "t"},
                                           {"id": "b", "audio": "x.flac", "text": "t", "lang": "fr"}])
    assert [s.language for s in open_dataset(m, language="de")] == ["de", "fr"]
    assert [s.id for s in open_dataset(m, limit=1)] == ["a"]
    assert [s.id for s in open_dataset(m, keep_language="fr")] == ["a", "b"]  # unlabelled ones stay
    assert [s.id for s in open_dataset(m, keep_language="fr", language="de")] == ["b"]
    with pytest.raises(SlimWhisperError, match="no usable samples in language 'ru'"):
        open_dataset(m, keep_language="ru", language="de")


def test_detection_errors_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(SlimWhisperError, match="no such file"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(SlimWhisperError, match="manifest.jsonl"):
        detect_layout(tmp_path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(SlimWhisperError, match="unknown dataset file type"):
        detect_layout(tmp_path / "x.txt")
    write_jsonl(tmp_path / "m.jsonl", [{"audio": "missing.flac", "text": "t"}])
    with pytest.raises(SlimWhisperError, match="no usable samples.*1 missing"):
        open_dataset(tmp_path)
