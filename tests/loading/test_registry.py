"""loading/registry.py: short names and what to install when a package is missing."""
from __future__ import annotations

import pytest

from slimwhisper.errors import ModelNotFoundError
from slimwhisper.loading import load
from slimwhisper.loading.registry import SHORT_NAMES, ShortName


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ShortName("fake", "a test model", ("slimwhisper-no-such-pkg",), ("slimwhisper_no_such_pkg/model.bin",),
                     "slimwhisper_no_such_pkg")  # fmt: skip
    monkeypatch.setitem(SHORT_NAMES, "fake", fake)
    with pytest.raises(ModelNotFoundError, match="pip install slimwhisper-no-such-pkg"):
        load("fake")
