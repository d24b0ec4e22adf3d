"""Typed records shared by evaluation, calibration and training: one utterance, one skip, one dataset.

A dataset never loses an utterance quietly: whatever a reader or the audio loader cannot use goes into a
`SkipReport` with its id and the reason, and the report travels with the samples into every summary.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One utterance: where its audio is and what was said.

    `language` is a lower-case ISO-639 code ("en", "zh", "yue") or None when the source does not say;
    `duration` is in seconds, None when unknown (it is filled from the file header when the reader checks files).
    """

    id: str
    audio: Path
    text: str
    language: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["audio"] = str(self.audio)
        return d


@dataclass(frozen=True)
class Skipped:
    """An utterance left out, with a reason a person can act on."""

    id: str
    reason: str  # short category: "missing", "unreadable", "empty", "too long", "no text", ...
    detail: str = ""  # the full message (path, decoder error)


@dataclass
class SkipReport:
    """What was left out and why; counted by reason so a summary can say '3 missing, 1 unreadable'."""

    items: list[Skipped] = field(default_factory=list)

    def add(self, id: str, reason: str, detail: str = "") -> None:
        self.items.append(Skipped(id=id, reason=reason, detail=detail))

    def extend(self, other: SkipReport) -> None:
        self.items.extend(other.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> set[str]:
        return {s.id for s in self.items}

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.items).items()))

    def describe(self) -> str:
        """One line: 'skipped 4 utterances: 3 missing, 1 unreadable' (or 'skipped none')."""
        if not self.items:
            return "skipped none"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.by_reason().items())
        noun = "utterance" if len(self.items) == 1 else "utterances"
        return f"skipped {len(self.items)} {noun}: {parts}"

    def to_dict(self) -> dict:
        return {
            "n_skipped": len(self.items),
            "by_reason": self.by_reason(),
            "items": [asdict(s) for s in self.items],
        }


@dataclass
class Dataset:
    """Samples read from one source, plus what the reader had to skip."""

    samples: list[Sample]
    report: SkipReport
    layout: str  # "librispeech", "jsonl", "commonvoice", "hf_disk", "audiofolder"
    source: Path  # the file or folder actually read (e.g. the folder's manifest.jsonl), resolved

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def languages(self) -> dict[str, int]:
        """Count of samples per language ('?' where unknown)."""
        return dict(sorted(Counter(s.language or "?" for s in self.samples).items()))


def normalize_language(code: str | None) -> str | None:
    """'en-US' -> 'en', 'zh-CN' -> 'zh', ' DE ' -> 'de'; empty -> None. Whisper knows languages by primary tag."""
    if code is None:
        return None
    code = str(code).strip().lower().replace("_", "-")
    if not code:
        return None
    return code.split("-")[0]
