"""data/records.py: language codes and the skip report."""
from __future__ import annotations

import pytest

from slimwhisper.data import SkipReport, normalize_language


@pytest.mark.parametrize("code,expected", [("en-US", "en"), ("zh_CN", "zh"), (" DE ", "de"), ("", None), (None, None),
                                           ("yue", "yue")])
def test_normalize_language(code: str | None, expected: str | None) -> None:
    assert normalize_language(code) == expected


def test_skip_report_counts_by_reason() -> None:
    r = SkipReport()
    assert r.describe() == "skipped none"
    r.add("a", "missing")
    r.add("b", "missing")
    r.add("c", "empty", "c.wav: no samples")
    assert r.describe() == "skipped 3 utterances: 1 empty, 2 missing"
    assert r.to_dict()["by_reason"] == {"empty": 1, "missing": 2}
    assert r.ids == {"a", "b", "c"}
