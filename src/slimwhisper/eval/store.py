"""The per-utterance JSONL logs that make an evaluation resumable, safe to kill and safe to split.

Line 1 of a log is a header naming the run's settings (models with a weight fingerprint, decoding options,
data); every other line is one utterance scored by one model, appended and fsynced as soon as it exists. A
process killed mid-write leaves at most a partial last line: the next run cuts it off its own log and ignores
it in any other. A restarted run reads every log in the folder and skips the (model, id) pairs already there.
Records are keyed by (model, id), so a line that reached two logs still counts once.

A single process appends to utterances.jsonl; each process of a sharded run appends to its own
utterances.rank-K.jsonl, so no two processes ever write one file. At the end the main process rewrites
utterances.jsonl from all of them in the plan's order (temporary file + rename) and removes the rank logs, so
the finished log is the same however the work was split or interrupted. A log written under other settings is
refused rather than mixed: numbers from two decoders in one table would be wrong and look right.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import SlimWhisperError

HEADER_KEY = "_run"
UTTERANCES_FILE = "utterances.jsonl"
RANK_GLOB = "utterances.rank-*.jsonl"


def rank_file(rank: int) -> str:
    """The log one process of a sharded run appends to."""
    return f"utterances.rank-{rank}.jsonl"


def write_atomic(path: Path, text: str) -> None:
    """Write through a hidden temporary sibling and one rename, so a kill leaves the old file or the new one,
    never a part of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_stale_temps(folder: Path, pattern: str) -> None:
    """Temporary files of atomic writes that a kill interrupted (call only while no other process writes)."""
    for tmp in folder.glob(f".{pattern}.tmp-*"):
        tmp.unlink(missing_ok=True)


def _drop_torn_tail(path: Path) -> None:
    """A process killed mid-write leaves a partial last line: cut the file back to its last newline."""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


class UtteranceStore:
    """Scored utterances keyed by (model role, utterance id), read from every log in the folder; this process
    appends to its own log (`rank_file(rank)` when `world` > 1)."""

    def __init__(self, out_dir: Path, settings: dict, *, rank: int = 0, world: int = 1) -> None:
        self.folder = Path(out_dir)
        self.path = self.folder / (UTTERANCES_FILE if world == 1 else rank_file(rank))
        self.settings = json.loads(json.dumps(settings))  # as it will read back from disk
        self._records: dict[tuple[str, str], dict] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _drop_torn_tail(self.path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            # atomically, so another process never reads a log without its header
            write_atomic(self.path, self._header_line())
        # other processes may be appending to their logs while this one reads them
        self.reload(live=world > 1)

    def _header_line(self) -> str:
        return json.dumps({HEADER_KEY: self.settings}, ensure_ascii=False) + "\n"

    def log_files(self) -> list[Path]:
        """utterances.jsonl (when there is one) and every rank log, in a fixed order."""
        merged = self.folder / UTTERANCES_FILE
        return ([merged] if merged.exists() else []) + sorted(self.folder.glob(RANK_GLOB))

    def reload(self, live: bool = False) -> None:
        """Read every log afresh. `live`: other processes are writing theirs, so a line of theirs that does not
        parse is passed over (the merge, after they stop, reads every line strictly)."""
        self._records = {}
        for path in self.log_files():
            self._read(path, strict=not live or path == self.path)

    def _read(self, path: Path, strict: bool = True) -> None:
        # split on b"\n" only: the piece after the last newline is a line still being written (or torn), and
        # str.splitlines would also split inside texts holding U+2028 and similar separators
        lines = path.read_bytes().split(b"\n")[:-1]
        if not lines:
            return
        try:
            header = json.loads(lines[0])[HEADER_KEY]
        except (ValueError, KeyError, TypeError) as exc:
            raise SlimWhisperError(f"{path} is not a slimwhisper evaluation log; choose another --out folder") from exc
        if header != self.settings:
            raise SlimWhisperError(
                f"{path} holds results of a different run ({_diff(header, self.settings)}); "
                "use a new --out folder, or delete the file to start over"
            )
        for lineno, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["model"], rec["id"])
            except (ValueError, KeyError, TypeError) as exc:
                if not strict:
                    continue
                raise SlimWhisperError(
                    f"{path}:{lineno} is corrupt; delete that line (or the file) and run again"
                ) from exc
            self._records[key] = rec

    def done(self, model: str) -> set[str]:
        return {uid for (tag, uid) in self._records if tag == model}

    def get(self, model: str, uid: str) -> dict | None:
        return self._records.get((model, uid))

    def records(self, model: str, ids: Iterable[str]) -> list[dict]:
        """Records of one model for the given ids, in that order; ids without a record are left out."""
        return [self._records[(model, i)] for i in ids if (model, i) in self._records]

    def append(self, records: list[dict]) -> None:
        """Write and fsync records at once, so a kill loses at most the batch being decoded."""
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for rec in records:
            self._records[(rec["model"], rec["id"])] = rec

    def merge(self, order: Iterable[tuple[str, str]]) -> None:
        """Rewrite utterances.jsonl from every log: the header, the records of `order` ((model, id) pairs) in that
        order, then any others (from earlier runs over more data) sorted; then remove the rank logs it absorbed.

        Only the main process calls this, once the others have stopped writing.
        """
        self.reload()
        absorbed = sorted(self.folder.glob(RANK_GLOB))
        first = list(dict.fromkeys(k for k in order if k in self._records))
        rest = sorted(set(self._records) - set(first))
        lines = [json.dumps(self._records[k], ensure_ascii=False) + "\n" for k in first + rest]
        write_atomic(self.folder / UTTERANCES_FILE, self._header_line() + "".join(lines))
        for path in absorbed:  # after the rename: a kill in between leaves copies, which count once
            path.unlink(missing_ok=True)
        remove_stale_temps(self.folder, "utterances*")
        self.path = self.folder / UTTERANCES_FILE
