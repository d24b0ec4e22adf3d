"""Text normalisation before scoring, as the speech community does it.

English: Whisper's `EnglishTextNormalizer` (contractions, numbers to digits, British to American spelling),
the normaliser the Open ASR Leaderboard scores with. Other languages: Whisper's `BasicTextNormalizer`
(lower case, brackets and punctuation removed). The normaliser code is the copy transformers ships; the
spelling table (about 1,700 British/American pairs) comes from the `whisper-normalizer` package, which ships
Whisper's `english.json` unchanged.

Languages written without spaces (zh, ja, th, ...) are scored by characters: CER is their headline metric and
their WER is computed on single characters (Whisper's `split_letters`), so it is still meaningful.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache, lru_cache
from importlib import resources

from ..errors import SlimWhisperError

# Scripts without word separators: words are not a unit, characters are.
CER_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue", "bo"})

NORMALIZER_VERSION = "whisper-en+basic/1"  # bump when scoring changes; stored with every run

# (package, resource) pairs that hold Whisper's English spelling table, most preferred first.
_SPELLING_SOURCES = (("whisper_normalizer", "normalizers/english.json"), ("whisper", "normalizers/english.json"))


@lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    """Whisper's British -> American spelling table, from whichever installed package ships it."""
    for package, resource in _SPELLING_SOURCES:
        try:
            text = resources.files(package).joinpath(resource).read_text(encoding="utf-8")
        except (ModuleNotFoundError, FileNotFoundError, OSError):
            continue
        return json.loads(text)
    raise SlimWhisperError(
        "Whisper's English spelling table is not installed; `pip install whisper-normalizer` "
        "(it ships the table the English normaliser needs)"
    )


@cache
def normalizer_for(language: str | None) -> Callable[[str], str]:
    """The scoring normaliser for a language code; an unknown language (None) gets the basic one."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if language == "en":
        return EnglishTextNormalizer(english_spelling_mapping())
    return BasicTextNormalizer(remove_diacritics=False, split_letters=language in CER_LANGUAGES)


def uses_cer(language: str | None) -> bool:
    """True where CER, not WER, is the number to quote."""
    return language in CER_LANGUAGES


def normalize(text: str, language: str | None) -> str:
    """Normalised text with single spaces and no leading/trailing space."""
    return re.sub(r"\s+", " ", normalizer_for(language)(text)).strip()


def char_text(normalized: str, language: str | None) -> str:
    """The string CER is computed on: normalised text, without spaces where the script has none."""
    return normalized.replace(" ", "") if uses_cer(language) else normalized
