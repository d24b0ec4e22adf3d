"""Summaries of an evaluation: corpus WER/CER per language and overall, paired deltas, JSON and Markdown.

Scores are always recomputed from the utterance log, so a resumed run reports on everything it holds for
the requested samples, not only on what the last invocation decoded. Only `VOLATILE` fields (wall-clock and
decoding times) depend on how the run went: the rest of summary.json is the same for an uninterrupted run, a
run killed and resumed, and a run split over several processes (`comparable` drops the volatile part).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import SkipReport
from ..errors import SlimWhisperError
from .metrics import Bootstrap, corpus_rate, paired_bootstrap
from .normalize import uses_cer
from .store import UTTERANCES_FILE, UtteranceStore, remove_stale_temps, write_atomic

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
ALL = "all"
# Fields of summary.json that measure time, not accuracy: they differ between two runs of one command.
VOLATILE = ("wall_seconds", "timing")


def comparable(summary: dict) -> dict:
    """summary.json without its volatile (timing) fields: what must agree between two runs of one command."""
    return {k: v for k, v in summary.items() if k not in VOLATILE}


@dataclass
class Row:
    """Scores of one language (or of everything, language 'all')."""

    language: str
    n_utterances: int
    n_words: int
    n_chars: int
    wer: float
    cer: float
    primary: str  # "wer" or "cer": the number to quote for this language
    baseline_wer: float | None = None
    baseline_cer: float | None = None
    delta_wer: Bootstrap | None = None
    delta_cer: Bootstrap | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "language": self.language, "n_utterances": self.n_utterances, "n_words": self.n_words,
            "n_chars": self.n_chars, "wer": _num(self.wer), "cer": _num(self.cer), "primary": self.primary,
        }
        if self.delta_wer is not None and self.delta_cer is not None:
            d.update(baseline_wer=_num(self.baseline_wer), baseline_cer=_num(self.baseline_cer))
            for name, b in (("delta_wer", self.delta_wer), ("delta_cer", self.delta_cer)):
                d[name] = _num(b.delta)
                d[f"{name}_ci"] = [_num(b.low), _num(b.high)]
                d[f"{name}_significant"] = b.significant
                d[f"{name}_mark"] = b.mark
                d[f"{name}_p"] = _num(b.p_value)
        return d


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class EvalResult:
    """What `evaluate` returns: overall and per-language rows, skips, settings and where the files are."""

    model: str
    baseline: str | None
    overall: Row
    languages: list[Row]
    skipped: SkipReport
    settings: dict
    out_dir: Path
    wall_seconds: float
    timing: dict = field(default_factory=dict)
    n_bootstrap: int = 0

    @property
    def wer(self) -> float:
        return self.overall.wer

    @property
    def cer(self) -> float:
        return self.overall.cer

    def to_dict(self) -> dict:
        d = {"model": self.model, "baseline": self.baseline, **self.overall.to_dict()}
        d.pop("language")
        d["languages"] = {r.language: r.to_dict() for r in self.languages}
        d["skipped"] = self.skipped.to_dict()
        d["settings"] = self.settings
        d["n_bootstrap"] = self.n_bootstrap
        d["wall_seconds"] = round(self.wall_seconds, 2)
        d["timing"] = self.timing
        # names next to summary.json, not paths: the summary does not change with where the folder lives
        d["files"] = {"utterances": UTTERANCES_FILE, "summary": SUMMARY_JSON, "markdown": SUMMARY_MD}
        return d


def _row(language: str, recs: list[dict], base: list[dict] | None, n_bootstrap: int, seed: int) -> Row:
    we, nw = [r["word_errors"] for r in recs], [r["n_words"] for r in recs]
    ce, nc = [r["char_errors"] for r in recs], [r["n_chars"] for r in recs]
    langs = {r["language"] for r in recs}
    row = Row(language, len(recs), int(sum(nw)), int(sum(nc)), corpus_rate(we, nw), corpus_rate(ce, nc),
              "cer" if langs and all(uses_cer(x) for x in langs) else "wer")
    if base is not None:
        bwe, bce = [r["word_errors"] for r in base], [r["char_errors"] for r in base]
        row.baseline_wer, row.baseline_cer = corpus_rate(bwe, nw), corpus_rate(bce, nc)
        row.delta_wer = paired_bootstrap(we, bwe, nw, n_draws=n_bootstrap, seed=seed)
        row.delta_cer = paired_bootstrap(ce, bce, nc, n_draws=n_bootstrap, seed=seed)
    return row


def _timing(roles: list[str], recs: list[dict], base: list[dict] | None) -> dict:
    """Decoding seconds, audio seconds and real-time factor per model, over every logged utterance."""
    out = {}
    for role, rows in zip(roles, (recs, base or [])):
        decode = sum(r.get("decode_seconds", 0.0) for r in rows)
        audio = sum(r.get("duration") or 0.0 for r in rows)
        out[role] = {"decode_seconds": round(decode, 2), "audio_seconds": round(audio, 2),
                     "rtf": round(decode / audio, 4) if audio else None}
    return out


def summarize(
    store: UtteranceStore, roles: list[str], tags: dict[str, str], ids: list[str], *, report: SkipReport,
    settings: dict, out_dir: Path, wall_seconds: float, n_bootstrap: int = 10_000, seed: int = 0, write: bool = True,
) -> EvalResult:
    """Rows from the log for `ids`; with a baseline, only utterances both models scored are compared. `write`
    False computes without writing (the other processes of a sharded run: the main one writes)."""
    has_base = "baseline" in roles
    keep = [i for i in ids if store.get("model", i) and (not has_base or store.get("baseline", i))]
    recs = store.records("model", keep)
    base = store.records("baseline", keep) if has_base else None
    if not recs:
        raise SlimWhisperError(
            f"no utterance could be evaluated ({report.describe()}); check the data paths and the model's languages"
        )
    languages = sorted({r["language"] for r in recs})
    rows = []
    for lang in languages:
        sel = [k for k, r in enumerate(recs) if r["language"] == lang]
        rows.append(_row(lang, [recs[k] for k in sel], [base[k] for k in sel] if base else None, n_bootstrap, seed))
    overall = _row(ALL, recs, base, n_bootstrap, seed)
    result = EvalResult(tags["model"], tags.get("baseline"), overall, rows, report, settings, out_dir, wall_seconds,
                        _timing(roles, recs, base), n_bootstrap if has_base else 0)
    if write:
        write_reports(result)
    return result


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _delta(b: Bootstrap | None) -> str:
    if b is None or not math.isfinite(b.delta):
        return "–"
    return f"{100 * b.delta:+.2f} [{100 * b.low:+.2f}, {100 * b.high:+.2f}]"


def markdown_table(result: EvalResult) -> str:
    """The model-card table: one row per language and 'all', rates in %, deltas with 95% CI and ✱/ns."""
    base = result.baseline is not None
    head = ["language", "utts", "words", "WER %", "CER %"]
    if base:
        head += ["baseline WER %", "ΔWER [95% CI]", "sig", "baseline CER %", "ΔCER [95% CI]", "sig"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*result.languages, result.overall]:
        name = f"**{r.language}**" if r.language == ALL else r.language + (" (CER)" if r.primary == "cer" else "")
        cells = [name, str(r.n_utterances), str(r.n_words), _pct(r.wer), _pct(r.cer)]
        if base:
            cells += [_pct(r.baseline_wer), _delta(r.delta_wer), r.delta_wer.mark if r.delta_wer else "–",
                      _pct(r.baseline_cer), _delta(r.delta_cer), r.delta_cer.mark if r.delta_cer else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: EvalResult) -> str:
    s = result.settings
    title = f"# {result.model}" + (f" vs {result.baseline}" if result.baseline else "")
    beams = s["num_beams"]
    decoding = "greedy" if beams == 1 else f"beam search ({beams} beams)"
    long_audio = {"longform": "decoded long-form (timestamps, sequential 30-s windows)", "skip": "skipped",
                  "error": "refused"}[s["long_audio"]]
    notes = [
        f"Decoding: {decoding}, language {s['language'] or 'per sample'}; clips over 30 s {long_audio}.",
        (
            "Text normalised with Whisper's English normaliser (en) and its basic normaliser (other languages); "
            "rates are corpus-level (total errors / total reference words or characters)."
        ),
        f"Data: {s['data']}; {result.skipped.describe()}.",
    ]
    if result.baseline:
        notes.append(f"Δ = model − baseline, paired bootstrap over utterances ({result.n_bootstrap} draws); "
                     "✱ = the 95% interval excludes 0, ns = not significant.")
    return "\n".join([title, "", markdown_table(result), "", *notes, ""])


def write_reports(result: EvalResult) -> None:
    """summary.json and summary.md, each replaced in one rename: a kill never leaves half a summary."""
    result.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(result.out_dir / SUMMARY_JSON, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    write_atomic(result.out_dir / SUMMARY_MD, markdown(result))
    remove_stale_temps(result.out_dir, "summary.*")
