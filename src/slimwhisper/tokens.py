"""Whisper's control tokens and decoder prompt: one source for every part that needs them.

Ids differ between the English-only and the multilingual vocabularies, so they are always looked up:
from the tokenizer when building a model's configs (`TokenIds.from_tokenizer`), from the generation
config everywhere after (`TokenIds.from_generation_config`: the engine, training labels, calibration).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import SlimWhisperError

EOT, SOT, NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"
TASKS = ("transcribe", "translate")


def token_id(vocab: dict[str, int], token: str) -> int:
    """Id of a required control token; its absence means the vocabulary is not Whisper's."""
    if token not in vocab:
        raise SlimWhisperError(f"tokenizer.json has no {token} token; it is not a Whisper tokenizer")
    return vocab[token]


@dataclass(frozen=True)
class TokenIds:
    """Ids of the control tokens, the suppression lists and the task/language maps of one vocabulary."""

    eot: int
    sot: int
    no_timestamps: int | None
    prev_sot: int | None
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    max_initial_timestamp_index: int | None = None
    task_to_id: dict[str, int] = field(default_factory=dict)
    lang_to_id: dict[str, int] = field(default_factory=dict)

    @property
    def timestamp_begin(self) -> int | None:
        """<|0.00|>: the timestamp tokens follow <|notimestamps|>."""
        return None if self.no_timestamps is None else self.no_timestamps + 1

    @property
    def no_speech(self) -> int | None:
        """<|nospeech|> / <|nocaptions|>, the token just before <|notimestamps|> (as transformers assumes)."""
        return None if self.no_timestamps is None else self.no_timestamps - 1

    @property
    def multilingual(self) -> bool:
        """Whether prompts carry language and task tokens (the generation config lists languages)."""
        return bool(self.lang_to_id)

    @classmethod
    def from_generation_config(cls, config: Any) -> TokenIds:
        eot = config.eos_token_id
        eot = eot[0] if isinstance(eot, (list, tuple)) else eot
        languages = getattr(config, "lang_to_id", None) or {}
        multilingual = getattr(config, "is_multilingual", None)
        return cls(
            eot=int(eot),
            sot=int(config.decoder_start_token_id),
            no_timestamps=getattr(config, "no_timestamps_token_id", None),
            prev_sot=getattr(config, "prev_sot_token_id", None),
            suppress=list(getattr(config, "suppress_tokens", None) or []),
            begin_suppress=list(getattr(config, "begin_suppress_tokens", None) or []),
            max_initial_timestamp_index=getattr(config, "max_initial_timestamp_index", None),
            task_to_id=dict(getattr(config, "task_to_id", None) or {}),
            lang_to_id=dict(languages) if multilingual is not False else {},
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenIds:
        """Look the control tokens up by name in a Whisper tokenizer, so no vocabulary layout is assumed."""
        vocab = tokenizer.get_vocab()
        return cls(eot=token_id(vocab, EOT), sot=token_id(vocab, SOT), no_timestamps=token_id(vocab, NO_TIMESTAMPS),
                   prev_sot=token_id(vocab, "<|startofprev|>"),
                   task_to_id={task: token_id(vocab, f"<|{task}|>") for task in TASKS})

    def language_id(self, language: str) -> int:
        """The <|xx|> token of a language code (or of the token itself)."""
        token = language if language.startswith("<|") else f"<|{language.lower()}|>"
        if token not in self.lang_to_id:
            raise SlimWhisperError(f"language {language!r} is not one this model knows "
                                   f"({len(self.lang_to_id)} languages); give a code such as en, de or fr, or "
                                   "leave --language out to detect it")
        return self.lang_to_id[token]


def decoder_prompt(ids: TokenIds, language_id: int | None, task: str = "transcribe", timestamps: bool = False,
                   previous: list[int] | tuple[int, ...] = ()) -> list[int]:
    """[<|startofprev|> previous...] SOT [<|lang|> <|task|>] [<|notimestamps|>]: the prompt `generate` builds.

    English-only models take no language or task token; a multilingual model whose language is not known
    yet (None) takes the task alone.
    """
    prompt = [ids.prev_sot, *previous] if previous else []
    prompt.append(ids.sot)
    if ids.multilingual:
        if language_id is not None:
            prompt.append(language_id)
        if task not in ids.task_to_id:
            raise SlimWhisperError(f"unknown task {task!r}; choose one of {sorted(ids.task_to_id)}")
        prompt.append(ids.task_to_id[task])
    if not timestamps and ids.no_timestamps is not None:
        prompt.append(ids.no_timestamps)
    return prompt
