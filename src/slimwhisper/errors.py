"""User-facing errors.

Anything a user can get wrong (a path, a model name, an impossible rank) raises `SlimWhisperError`
with a message that says what to do. The CLI turns it into one line on stderr and exit code 2;
library callers can catch it like any `ValueError`.
"""
from __future__ import annotations


class SlimWhisperError(ValueError):
    """A problem with the user's input, explained in one sentence that says what to do."""


class AudioError(SlimWhisperError):
    """Audio that is missing, unreadable, empty or otherwise unusable."""


class ModelNotFoundError(SlimWhisperError):
    """A model name or path that cannot be resolved to weights on this machine."""


class ConfigVersionError(SlimWhisperError):
    """A saved compression config written by an unknown (newer) format version."""
