"""Reader for a Hugging Face `datasets` dataset saved with `save_to_disk`.

`save_to_disk` embeds the audio bytes in Arrow files. Every other part of slimwhisper works on audio paths, so
the bytes are written once to a cache folder (one file per utterance, the original encoding kept) and the
samples point there; a second run finds them and writes nothing. Decoding is left to soundfile like every
other layout, so the `datasets` audio decoders (torchcodec) are never needed.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import SlimWhisperError
from .records import Sample, normalize_language

TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text", "raw_transcription")
LANG_COLUMNS = ("language", "lang", "locale")
ID_COLUMNS = ("id", "segment_id", "utt_id", "key")
_MAGIC = ((b"fLaC", ".flac"), (b"RIFF", ".wav"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))


def is_hf_disk(path: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (state.json + dataset_info.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def default_cache_dir() -> Path:
    base = os.environ.get("SLIMWHISPER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimwhisper"
    )
    return Path(base) / "hf_audio"


def _pick_split(obj: object, path: Path, split: str | None):
    """A DatasetDict's split: the one asked for, else 'test', else the only one."""
    if not hasattr(obj, "keys"):
        return obj, split or "data"
    names = list(obj.keys())  # type: ignore[attr-defined]
    if split is None:
        split = "test" if "test" in names else names[0] if len(names) == 1 else None
    if split not in names:
        raise SlimWhisperError(f"{path}: choose a split with --split ({', '.join(names)})")
    return obj[split], split  # type: ignore[index]


def _audio_column(ds) -> str:
    from datasets import Audio

    audio_cols = [name for name, feat in ds.features.items() if isinstance(feat, Audio)]
    if audio_cols:
        return audio_cols[0]
    if "audio" in ds.features:
        return "audio"
    raise SlimWhisperError(f"no audio column among {', '.join(ds.features)}; cast one with datasets.Audio()")


def _suffix(data: bytes, path: str | None) -> str:
    if path and Path(path).suffix:
        return Path(path).suffix.lower()
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".audio"  # soundfile sniffs the format from the content


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "utt"


def _materialise(value: object, target_stem: Path) -> Path | str:
    """Write one audio cell to disk; returns the path, or a reason string when the cell holds nothing usable."""
    if not isinstance(value, dict):
        return "audio cell is not a dict"
    data, src = value.get("bytes"), value.get("path")
    if data:
        out = target_stem.parent / (target_stem.name + _suffix(data, src))
        if not (out.is_file() and out.stat().st_size == len(data)):
            tmp = out.parent / (out.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(out)
        return out
    if "array" in value and value.get("sampling_rate"):
        import soundfile as sf

        out = target_stem.parent / (target_stem.name + ".wav")
        if not out.is_file():
            sf.write(str(out), value["array"], int(value["sampling_rate"]), subtype="FLOAT")
        return out
    if src:
        return Path(src)
    return "audio cell has neither bytes nor a path"


def read_hf_disk(path: Path, *, split: str | None = None, cache_dir: Path | None = None) -> Iterator[Sample | tuple]:
    """Samples of a saved dataset; audio bytes are written under `cache_dir` (default ~/.cache/slimwhisper)."""
    try:
        import datasets
    except ImportError as exc:
        raise SlimWhisperError(
            f"{path} is a Hugging Face datasets folder; install the reader with `pip install datasets`"
        ) from exc
    ds, split = _pick_split(datasets.load_from_disk(str(path)), path, split)
    column = _audio_column(ds)
    if isinstance(ds.features[column], datasets.Audio):
        ds = ds.cast_column(column, datasets.Audio(decode=False))
    cols = set(ds.column_names)
    text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
    if text_col is None:
        raise SlimWhisperError(f"{path}: no transcript column; name one of {', '.join(TEXT_COLUMNS)}")
    lang_col = next((c for c in LANG_COLUMNS if c in cols), None)
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    stamp = ";".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*.arrow")))
    key = hashlib.sha1(f"{path.resolve()}|{split}|{stamp}".encode()).hexdigest()[:16]
    out_dir = (cache_dir or default_cache_dir()) / key
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(ds):
        rid = str(row[id_col]) if id_col and row[id_col] not in (None, "") else f"{split}-{i:06d}"
        audio = _materialise(row[column], out_dir / f"{i:06d}_{_safe(rid)}")
        if isinstance(audio, str):
            yield (rid, "no audio", f"row {i}: {audio}")
            continue
        lang = normalize_language(row[lang_col]) if lang_col else None
        yield Sample(id=rid, audio=audio, text=str(row[text_col] or "").strip(), language=lang)
