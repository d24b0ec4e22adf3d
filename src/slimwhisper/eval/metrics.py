"""Error counts, corpus-level rates and the paired bootstrap.

Corpus WER is total errors over total reference words, never the mean of per-utterance rates (which would
let a two-word clip weigh as much as a paragraph). The paired bootstrap resamples utterances, keeping each
utterance's two hypotheses together, so the interval reflects how much the *difference* depends on which
utterances happened to be in the test set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIGNIFICANT = "✱"
NOT_SIGNIFICANT = "ns"


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations aligning a hypothesis to its reference, and the reference length."""

    substitutions: int
    deletions: int
    insertions: int
    n_ref: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Word-level alignment of two normalised strings (either may be empty)."""
    import jiwer

    out = jiwer.process_words(reference, hypothesis)
    n_ref = out.hits + out.substitutions + out.deletions
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, n_ref)


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Character-level alignment (spaces count as characters, as in jiwer's CER)."""
    import jiwer

    out = jiwer.process_characters(reference, hypothesis)
    n_ref = out.hits + out.substitutions + out.deletions
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, n_ref)


def corpus_rate(errors: np.ndarray | list[int], n_ref: np.ndarray | list[int]) -> float:
    """sum(errors) / sum(n_ref); NaN when there is no reference token at all."""
    total = float(np.sum(n_ref))
    return float(np.sum(errors)) / total if total > 0 else math.nan


def corpus_wer(references: list[str], hypotheses: list[str], language: str | None) -> float:
    """Corpus WER (CER-style character rate for languages without spaces) after the language's scoring
    normaliser: the one figure every report of this project quotes."""
    from .normalize import char_text, normalize, uses_cer

    errors, n_ref = [], []
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_n, hyp_n = normalize(ref, language), normalize(hyp, language)
        if uses_cer(language):
            counts = char_errors(char_text(ref_n, language), char_text(hyp_n, language))
        else:
            counts = word_errors(ref_n, hyp_n)
        errors.append(counts.errors)
        n_ref.append(counts.n_ref)
    return corpus_rate(errors, n_ref)


@dataclass(frozen=True)
class Bootstrap:
    """Paired bootstrap of corpus rate(model) - rate(baseline); positive means the model makes more errors."""

    delta: float
    low: float
    high: float
    p_value: float
    n_draws: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return bool(self.low > 0 or self.high < 0)

    @property
    def mark(self) -> str:
        return SIGNIFICANT if self.significant else NOT_SIGNIFICANT

    def to_dict(self) -> dict:
        return {
            "delta": _finite(self.delta),
            "ci": [_finite(self.low), _finite(self.high)],
            "confidence": self.confidence,
            "p_value": _finite(self.p_value),
            "significant": self.significant,
            "mark": self.mark,
            "n_draws": self.n_draws,
        }


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def paired_bootstrap(
    errors_model: np.ndarray | list[int],
    errors_baseline: np.ndarray | list[int],
    n_ref: np.ndarray | list[int],
    *,
    n_draws: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Bootstrap:
    """Resample utterances with replacement `n_draws` times; percentile interval of the corpus-rate delta.

    The three arrays are aligned per utterance. Draws run in blocks so memory stays ~16 MB whatever the size.
    """
    a = np.asarray(errors_model, dtype=np.float64)
    b = np.asarray(errors_baseline, dtype=np.float64)
    r = np.asarray(n_ref, dtype=np.float64)
    if not (a.shape == b.shape == r.shape) or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs three aligned 1-D arrays, got {a.shape}, {b.shape}, {r.shape}")
    delta = corpus_rate(a, r) - corpus_rate(b, r)
    n = a.size
    if n == 0 or not math.isfinite(delta):
        return Bootstrap(delta, math.nan, math.nan, math.nan, 0, confidence)
    rng = np.random.default_rng(seed)
    diff = a - b
    block = max(1, 2_000_000 // n)
    deltas = []
    for start in range(0, n_draws, block):
        idx = rng.integers(0, n, size=(min(block, n_draws - start), n))
        refs = r[idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            deltas.append(diff[idx].sum(axis=1) / refs)
    d = np.concatenate(deltas)
    d = d[np.isfinite(d)]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(d, [tail, 1.0 - tail])
    p = min(1.0, 2.0 * min(np.mean(d <= 0), np.mean(d >= 0)))
    return Bootstrap(float(delta), float(low), float(high), float(p), int(d.size), confidence)
