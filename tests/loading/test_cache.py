"""loading/cache.py: a failed cache write leaves nothing behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from slimwhisper.loading import cache


def test_a_failed_cache_write_leaves_nothing(tmp_path: Path) -> None:
    entry = cache.entry_dir(tmp_path, "tiny.en", "0123")

    def crash(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.write_entry(entry, crash, {"sha256": "x"})
    assert not entry.exists() and not list(entry.parent.glob(".tmp-*"))
