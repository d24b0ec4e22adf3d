"""eval/metrics.py: error counts, corpus rates and the paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from slimwhisper.eval import corpus_rate, paired_bootstrap, word_errors
from slimwhisper.eval.metrics import char_errors


def test_error_counts_and_corpus_rate_is_not_a_mean_of_rates() -> None:
    e = word_errors("a b c d", "a x c d e")
    assert (e.substitutions, e.deletions, e.insertions, e.n_ref, e.errors) == (1, 0, 1, 4, 2)
    assert word_errors("", "a b").errors == 2 and word_errors("", "").n_ref == 0
    assert char_errors("abc", "abd").errors == 1
    # one 1-word utterance fully wrong + one 9-word utterance perfect: corpus 10%, mean of rates 50%
    assert corpus_rate([1, 0], [1, 9]) == pytest.approx(0.1)
    assert np.isnan(corpus_rate([0], [0]))


def test_paired_bootstrap_marks_real_and_null_differences() -> None:
    rng = np.random.default_rng(1)
    n_ref = rng.integers(5, 30, size=200)
    base = rng.binomial(n_ref, 0.10)
    same = paired_bootstrap(base, base, n_ref, n_draws=2000)
    assert same.delta == 0 and same.low == 0 and same.high == 0 and same.mark == "ns"
    worse = base + rng.binomial(n_ref, 0.05)
    b = paired_bootstrap(worse, base, n_ref, n_draws=2000, seed=3)
    assert b.significant and b.mark == "✱" and 0 < b.low < b.delta < b.high
    assert b.delta == pytest.approx(corpus_rate(worse, n_ref) - corpus_rate(base, n_ref))
    assert paired_bootstrap(worse, base, n_ref, n_draws=2000, seed=3) == b  # seeded: reproducible
    noise = base + rng.integers(-1, 2, size=200).clip(min=-base)
    assert paired_bootstrap(noise, base, n_ref, n_draws=2000).mark == "ns"


def test_corpus_wer_normalises_and_pools_errors():
    from slimwhisper.eval.metrics import corpus_wer

    # Whisper's English normaliser: case, punctuation and number words do not count; errors pool over clips
    assert corpus_wer(["Hello, world.", "Twenty one cats"], ["hello world", "21 bats"], "en") == pytest.approx(1 / 4)
    assert corpus_wer(["你好世界"], ["你好世"], "zh") == pytest.approx(1 / 4)  # characters, not words
