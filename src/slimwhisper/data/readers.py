"""Readers for the dataset layouts users have, and `open_dataset`, which picks one by what it finds.

Layouts: a LibriSpeech-style tree (`*.trans.txt` beside FLAC files), a JSONL manifest (paths relative to the
manifest), a Common Voice release (`test.tsv` + `clips/`), a Hugging Face `datasets` dataset saved with
`save_to_disk`, and a folder of audio with a CSV (`metadata.csv`, the `audiofolder` convention).
Every reader yields `(id, audio path, text, language, duration)` rows; `open_dataset` then checks the files
(missing, unreadable, empty) and drops duplicates, each into the skip report under its id.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Literal

from ..errors import AudioError, SlimWhisperError
from .hf_disk import is_hf_disk, read_hf_disk
from .records import Dataset, Sample, SkipReport, normalize_language

Layout = Literal["librispeech", "jsonl", "commonvoice", "hf_disk", "audiofolder"]
OnError = Literal["skip", "raise"]

AUDIO_KEYS = ("audio", "audio_filepath", "audio_path", "path", "file", "file_name", "filename", "wav")
TEXT_KEYS = ("text", "sentence", "transcription", "transcript", "normalized_text", "raw_transcription")
LANG_KEYS = ("lang", "language", "locale")
AUDIO_SUFFIXES = {".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif"}

# A reader's row: a Sample, or (id, reason, detail) for an entry it could not make sense of.
Row = Sample | tuple[str, str, str]


def _first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return k
    return None


def _duration(value: object) -> float | None:
    try:
        d = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return d if d >= 0 else None


# --------------------------------------------------------------------------- LibriSpeech


def read_librispeech(root: Path) -> Iterator[Row]:
    """`<root>/**/<spk>-<chapter>.trans.txt` lines 'UTT-ID TEXT', audio `UTT-ID.flac` beside them (English)."""
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            utt, _, text = line.partition(" ")
            audio = _find_audio(trans.parent, utt)
            yield Sample(id=utt, audio=audio, text=text.strip(), language="en")


def _find_audio(folder: Path, stem: str) -> Path:
    """`stem.flac` if present, else any supported extension, else the (missing) .flac path for the report."""
    flac = folder / f"{stem}.flac"
    if flac.exists():
        return flac
    for suffix in sorted(AUDIO_SUFFIXES):
        cand = folder / f"{stem}{suffix}"
        if cand.exists():
            return cand
    return flac


# --------------------------------------------------------------------------- JSONL manifest


def read_jsonl(manifest: Path) -> Iterator[Row]:
    """One JSON object a line: audio (relative to the manifest), text, optional id / lang / duration."""
    base = manifest.parent
    with manifest.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{manifest.name}:{lineno}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")  # noqa: TRY004 (caught just below)
            except ValueError as exc:
                yield (where, "bad manifest line", f"{where}: {exc}")
                continue
            yield _row_to_sample(row, base, where)


def _row_to_sample(row: dict, base: Path, where: str) -> Row:
    """Map a dict with any of the usual key names to a Sample (or a skip row naming what is missing)."""
    akey, tkey, lkey = _first_key(row, AUDIO_KEYS), _first_key(row, TEXT_KEYS), _first_key(row, LANG_KEYS)
    rid = str(row["id"]) if row.get("id") not in (None, "") else None
    if akey is None:
        return (rid or where, "no audio field", f"{where}: none of {', '.join(AUDIO_KEYS)}")
    rel = str(row[akey])
    rid = rid or rel
    if tkey is None and not any(k in row for k in TEXT_KEYS):
        return (rid, "no text", f"{where}: none of {', '.join(TEXT_KEYS)}")
    text = str(row[tkey]) if tkey else ""
    audio = Path(rel) if Path(rel).is_absolute() else base / rel
    lang = normalize_language(row[lkey]) if lkey else None
    return Sample(id=rid, audio=audio, text=text.strip(), language=lang, duration=_duration(row.get("duration")))


# --------------------------------------------------------------------------- Common Voice


def read_commonvoice(tsv: Path) -> Iterator[Row]:
    """A Common Voice split TSV (`path`, `sentence`, optional `locale`), clips in `clips/` beside it."""
    clips = tsv.parent / "clips"
    folder_lang = tsv.parent.name if _looks_like_language(tsv.parent.name) else None
    with tsv.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"path", "sentence"} - set(reader.fieldnames or [])
        if missing:
            raise SlimWhisperError(
                f"{tsv}: not a Common Voice TSV (no column {', '.join(sorted(missing))}); "
                "give the release's language folder or one of its split files (test.tsv, dev.tsv)"
            )
        for row in reader:
            rel = row["path"]
            audio = clips / rel
            if not audio.exists() and (tsv.parent / rel).exists():  # some exports keep clips beside the TSV
                audio = tsv.parent / rel
            lang = normalize_language(row.get("locale") or folder_lang)
            yield Sample(id=Path(rel).stem, audio=audio, text=(row["sentence"] or "").strip(), language=lang)


def _looks_like_language(name: str) -> bool:
    head, _, tail = name.partition("-")
    return head.isalpha() and head.islower() and 2 <= len(head) <= 3 and (not tail or tail.isalpha())


# --------------------------------------------------------------------------- folder + CSV


def read_audiofolder(csv_path: Path) -> Iterator[Row]:
    """A CSV naming audio files (relative to the CSV) and their transcripts: `file_name,transcription[,language]`."""
    with csv_path.open(encoding="utf-8", newline="") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(fh, dialect=dialect)
        fields = tuple(reader.fieldnames or ())
        if not any(k in fields for k in AUDIO_KEYS) or not any(k in fields for k in TEXT_KEYS):
            raise SlimWhisperError(
                f"{csv_path}: the CSV needs an audio column ({'/'.join(AUDIO_KEYS[:6])}) and a text column "
                f"({'/'.join(TEXT_KEYS[:4])}); it has {', '.join(fields) or 'no header'}"
            )
        for lineno, row in enumerate(reader, 2):
            yield _row_to_sample(dict(row), csv_path.parent, f"{csv_path.name}:{lineno}")


# --------------------------------------------------------------------------- detection


def detect_layout(path: Path, split: str | None = None) -> tuple[Layout, Path]:
    """Decide the layout from what is on disk; returns it and the file or folder its reader takes."""
    if not path.exists():
        raise SlimWhisperError(f"{path}: no such file or folder; check the --data path")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return "jsonl", path
        if suffix == ".tsv":
            return "commonvoice", path
        if suffix == ".csv":
            return "audiofolder", path
        raise SlimWhisperError(
            f"{path}: unknown dataset file type '{suffix}'; give a .jsonl manifest, a Common Voice .tsv, "
            "a .csv beside audio files, or a folder"
        )
    if (path / "manifest.jsonl").is_file():
        return "jsonl", path / "manifest.jsonl"
    jsonls = sorted(path.glob("*.jsonl"))
    if len(jsonls) == 1:
        return "jsonl", jsonls[0]
    if is_hf_disk(path):
        return "hf_disk", path
    tsv = path / f"{split or 'test'}.tsv"
    if tsv.is_file() and (path / "clips").is_dir():
        return "commonvoice", tsv
    if (path / "metadata.csv").is_file():
        return "audiofolder", path / "metadata.csv"
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return "audiofolder", csvs[0]
    if next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech", path
    found = "several .jsonl files" if len(jsonls) > 1 else "several .csv files" if len(csvs) > 1 else "none"
    raise SlimWhisperError(
        f"{path}: no dataset layout recognised ({found}); expected manifest.jsonl, a LibriSpeech tree "
        f"(*.trans.txt), a Common Voice folder ({split or 'test'}.tsv + clips/), a datasets.save_to_disk folder "
        "or metadata.csv beside audio; point --data at the file itself if there are several"
    )


# --------------------------------------------------------------------------- checking + open_dataset


def check_audio_file(sample: Sample) -> tuple[Sample | None, str, str]:
    """Read the file header: (sample with duration filled, '', '') or (None, reason, detail)."""
    import soundfile as sf

    if not sample.audio.is_file():
        return None, "missing", f"{sample.audio}: no such file"
    try:
        info = sf.info(str(sample.audio))
    except Exception as exc:  # noqa: BLE001 (libsndfile raises its own error types)
        return None, "unreadable", f"{sample.audio}: {exc}"
    if info.frames <= 0 or info.samplerate <= 0:
        return None, "empty", f"{sample.audio}: no samples"
    duration = info.frames / info.samplerate
    return Sample(sample.id, sample.audio, sample.text, sample.language, duration), "", ""


def _explicit_target(layout: str, path: Path, split: str | None) -> Path:
    """The file a layout's reader takes when the user named the layout and gave its folder."""
    names = {"jsonl": "manifest.jsonl", "commonvoice": f"{split or 'test'}.tsv", "audiofolder": "metadata.csv"}
    return path / names[layout] if path.is_dir() and layout in names else path


def open_dataset(
    path: str | Path,
    *,
    layout: Layout | None = None,
    split: str | None = None,
    language: str | None = None,
    keep_language: str | None = None,
    check_files: bool = True,
    on_error: OnError = "skip",
    limit: int | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """Read any supported layout into a `Dataset`.

    `language` fills in samples whose source names none; `keep_language` keeps only samples in that language
    (unlabelled ones included); `split` picks a Common Voice TSV or a DatasetDict split; `limit` keeps the first
    N usable samples. With `on_error="raise"` the first bad entry raises instead of being skipped.
    """
    path = Path(path).expanduser()
    found, target = detect_layout(path, split) if layout is None else (layout, _explicit_target(layout, path, split))
    reader = _reader(found, split, cache_dir)
    if not target.exists():
        raise SlimWhisperError(f"{target}: no such file or folder; check the --data path")
    report = SkipReport()
    default_lang, wanted = normalize_language(language), normalize_language(keep_language)
    samples = _collect(reader(target), _skipper(report, on_error), default_lang=default_lang, wanted=wanted,
                       check_files=check_files, limit=limit)
    if not samples and target.is_file() and target.stat().st_size == 0:
        raise SlimWhisperError(f"{target} is empty (0 bytes); fill it with one entry per line, e.g. "
                               '{"audio": "a.wav", "text": "..."} in a manifest.jsonl')
    if not samples:
        what = f"no usable samples in language '{wanted}'" if wanted else "no usable samples"
        raise SlimWhisperError(
            f"{path}: {what} ({report.describe()}); check the paths and languages in the {found} data"
        )
    return Dataset(samples=samples, report=report, layout=found, source=target.resolve())  # type: ignore[arg-type]


def _reader(layout: str, split: str | None, cache_dir: Path | None) -> Callable[[Path], Iterator[Row]]:
    """The reader of `layout`; an unknown name is refused with the list of known ones."""
    readers: dict[str, Callable[[Path], Iterator[Row]]] = {
        "librispeech": read_librispeech,
        "jsonl": read_jsonl,
        "commonvoice": read_commonvoice,
        "hf_disk": partial(read_hf_disk, split=split, cache_dir=cache_dir),
        "audiofolder": read_audiofolder,
    }
    if layout not in readers:
        raise SlimWhisperError(f"unknown layout '{layout}'; use one of {', '.join(readers)}")
    return readers[layout]


def _skipper(report: SkipReport, on_error: OnError) -> Callable[[str, str, str], None]:
    """What happens to a bad entry: it goes into `report`, or with on_error="raise" stops the read."""

    def skip(rid: str, reason: str, detail: str) -> None:
        if on_error == "raise":
            raise AudioError(f"{rid}: {reason}: {detail}; fix or remove this entry, or drop --strict to skip it")
        report.add(rid, reason, detail)

    return skip


def _collect(rows: Iterator[Row], skip: Callable[[str, str, str], None], *, default_lang: str | None,
             wanted: str | None, check_files: bool, limit: int | None) -> list[Sample]:
    """The usable samples among `rows`, in order: bad and duplicate entries skipped, other languages left out."""
    samples: list[Sample] = []
    seen: set[str] = set()
    for row in rows:
        if limit is not None and len(samples) >= limit:
            break
        if isinstance(row, tuple):
            skip(*row)
            continue
        if row.id in seen:
            skip(row.id, "duplicate id", f"{row.audio}: id already used by an earlier entry")
            continue
        if row.language is None and default_lang is not None:
            row = Sample(row.id, row.audio, row.text, default_lang, row.duration)
        if wanted is not None and row.language not in (None, wanted):
            continue  # not selected: not a skip
        if check_files:
            checked, reason, detail = check_audio_file(row)
            if checked is None:
                skip(row.id, reason, detail)
                continue
            row = checked
        seen.add(row.id)
        samples.append(row)
    return samples
