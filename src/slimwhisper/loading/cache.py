"""On-disk cache of converted checkpoints, written atomically.

Layout: `<root>/converted/<label>-<key>/` is an ordinary Hugging Face model directory (safetensors,
config, generation config, processor) plus `slimwhisper_cache.json`, which is written last and marks
the entry complete. Entries are built in a temp directory and renamed into place, so a killed run
leaves only a `.tmp-*` directory that a later run sweeps away, never a half entry.
`<root>/sha256/` memoises content hashes of large files by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

MARKER = "slimwhisper_cache.json"
_CHUNK_BYTES = 8 << 20  # 8 MiB reads when hashing
_STALE_TMP_SECONDS = 3600  # a temp dir this old belongs to a run that died


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else `$SLIMWHISPER_CACHE`, else `$XDG_CACHE_HOME/slimwhisper` (~/.cache/slimwhisper)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("SLIMWHISPER_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimwhisper"


def fingerprint(paths: Sequence[Path], *extra: object) -> str:
    """A cheap identity of files (resolved path, size, mtime) plus `extra`; 16 hex digits."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(repr(extra).encode())
    return digest.hexdigest()[:16]


def sha256_files(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes read back to back (so split parts hash like the joined file)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def memoised_sha256(paths: Sequence[Path], root: Path) -> str:
    """`sha256_files`, remembered under `root/sha256/` until a file's size or mtime changes."""
    memo = root / "sha256" / fingerprint(paths)
    try:
        return memo.read_text(encoding="ascii").strip()
    except OSError:
        pass
    value = sha256_files(paths)
    try:
        _write_text_atomically(memo, value + "\n")
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return value


def entry_dir(root: Path, label: str, key: str) -> Path:
    """The directory of one converted checkpoint; `label` is made filesystem-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return root / "converted" / f"{safe[:60]}-{key}"


def read_marker(entry: Path) -> dict[str, Any] | None:
    """The completion marker of an entry, or None when the entry is absent or unreadable."""
    try:
        return json.loads((entry / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_entry(entry: Path, save: Callable[[Path], None], marker: dict[str, Any]) -> None:
    """Run `save(tmp_dir)`, add the marker, then rename into place; losing a race is fine."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(entry.parent)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if entry.exists() and read_marker(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry from an older writer
        os.rename(tmp, entry)
    except OSError:
        if read_marker(entry) is None:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_tmp(directory: Path) -> None:
    """Remove temp dirs left by runs that died mid-write."""
    now = time.time()
    for tmp in directory.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _write_text_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
