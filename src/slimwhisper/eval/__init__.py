"""Evaluation a speech team can trust: Whisper's normalisers, corpus-level WER/CER per language, paired
bootstrap against a baseline, a resumable per-utterance log, JSON + Markdown summaries."""
from __future__ import annotations

from .evaluate import Candidate, evaluate, model_fingerprint
from .metrics import Bootstrap, ErrorCounts, char_errors, corpus_rate, corpus_wer, paired_bootstrap, word_errors
from .normalize import CER_LANGUAGES, normalize, normalizer_for, uses_cer
from .report import EvalResult, Row, markdown, markdown_table

__all__ = [
    "CER_LANGUAGES",
    "Bootstrap",
    "Candidate",
    "ErrorCounts",
    "EvalResult",
    "Row",
    "char_errors",
    "corpus_rate",
    "corpus_wer",
    "evaluate",
    "markdown",
    "markdown_table",
    "model_fingerprint",
    "normalize",
    "normalizer_for",
    "paired_bootstrap",
    "uses_cer",
    "word_errors",
]
