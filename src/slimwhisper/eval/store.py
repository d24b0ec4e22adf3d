"""The per-utterance JSONL that makes an evaluation resumable.

Line 1 is a header naming the run's settings (models with a weight fingerprint, decoding options, data);
every other line is one utterance scored by one model, flushed as soon as it exists. A restarted run reads
the file, skips the (model, id) pairs already there and appends the rest. A file written under other
settings is refused rather than mixed: numbers from two decoders in one table would be wrong and look right.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import SlimWhisperError

HEADER_KEY = "_run"
UTTERANCES_FILE = "utterances.jsonl"


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


class UtteranceStore:
    """Append-only JSONL of scored utterances, keyed by (model tag, utterance id)."""

    def __init__(self, out_dir: Path, settings: dict) -> None:
        self.path = Path(out_dir) / UTTERANCES_FILE
        self.settings = json.loads(json.dumps(settings))  # as it will read back from disk
        self._records: dict[tuple[str, str], dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_torn_tail()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            with self.path.open("w", encoding="utf-8") as fh:
                fh.write(json.dumps({HEADER_KEY: self.settings}, ensure_ascii=False) + "\n")

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        try:
            header = json.loads(lines[0])[HEADER_KEY]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise SlimWhisperError(
                f"{self.path} is not a slimwhisper evaluation log; choose another --out folder"
            ) from exc
        if header != self.settings:
            raise SlimWhisperError(
                f"{self.path} holds results of a different run ({_diff(header, self.settings)}); "
                "use a new --out folder, or delete the file to start over"
            )
        for lineno, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["model"], rec["id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise SlimWhisperError(
                    f"{self.path}:{lineno} is corrupt; delete that line (or the file) and run again"
                ) from exc
            self._records[key] = rec

    def _drop_torn_tail(self) -> None:
        """A run killed mid-write leaves a partial last line: cut the file back to its last newline."""
        with self.path.open("rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            fh.truncate(data.rfind(b"\n") + 1)

    def done(self, model: str) -> set[str]:
        return {uid for (tag, uid) in self._records if tag == model}

    def get(self, model: str, uid: str) -> dict | None:
        return self._records.get((model, uid))

    def records(self, model: str, ids: Iterable[str]) -> list[dict]:
        """Records of one model for the given ids, in that order; ids without a record are left out."""
        return [self._records[(model, i)] for i in ids if (model, i) in self._records]

    def append(self, records: list[dict]) -> None:
        """Write and flush records at once, so a kill loses at most the batch being decoded."""
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for rec in records:
            self._records[(rec["model"], rec["id"])] = rec
