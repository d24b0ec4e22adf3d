"""eval/normalize.py: Whisper's English normaliser and the basic one for other languages."""
from __future__ import annotations

from slimwhisper.eval import normalize


def test_english_normaliser_is_whispers() -> None:
    assert normalize("Mr. Smith's colour is twenty-five dollars!", "en") == "mister smith is color is $25"
    assert normalize("  I won't [laughs] go, uh, there.  ", "en") == "i will not go there"


def test_basic_normaliser_for_other_languages_and_cer_scripts() -> None:
    assert normalize("Über die Straße, bitte!", "de") == "über die straße bitte"
    assert normalize("你好，世界！", "zh") == "你 好 世 界"
    assert normalize("Hello, World", None) == "hello world"
