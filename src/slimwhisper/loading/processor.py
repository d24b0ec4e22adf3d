"""Tokenizer, feature extractor and generation config for Whisper, built from files on disk.

`WhisperGenerationMixin.generate` reads its special ids from `generation_config` and refuses to run
(or runs wrong) when they are missing, so every field is set explicitly here rather than defaulted.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SlimWhisperError
from ..tokens import EOT, NO_TIMESTAMPS, SOT, TokenIds, token_id

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

SAMPLE_RATE = 16_000  # Hz
HOP_LENGTH = 160  # samples per mel frame (10 ms)
N_FFT = 400  # samples per STFT window (25 ms)
CHUNK_SECONDS = 30  # Whisper's fixed input window
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 20-ms steps
MAX_INITIAL_TIMESTAMP_INDEX = 50  # first timestamp at most 1.00 s, as openai-whisper
MULTILINGUAL_MIN_VOCAB = 51865  # openai-whisper's rule: the .en models have 51864 tokens


def english_normalizer_file() -> Path | None:
    """Whisper's English spelling table (normalizer.json), from whichever installed package ships it.

    whisper-normalizer is a dependency; openai-whisper, when installed, has the same MIT-licensed table.
    """
    for package in ("whisper_normalizer", "whisper"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "normalizers" / "english.json"
            if candidate.is_file():
                return candidate
    return None


def timestamp_tokens() -> list[str]:
    """The 1501 timestamp tokens in id order."""
    return [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]


def build_tokenizer(
    tokenizer_json: Path, vocab_size: int, normalizer_file: Path | None = None
) -> WhisperTokenizer:
    """A `WhisperTokenizer` whose ids match a model with `vocab_size` output classes.

    The special tokens from <|startoftranscript|> to <|notimestamps|> become `extra_special_tokens`
    in id order: transformers takes the first timestamp id as `all_special_ids[-1] + 1`. The
    timestamp tokens are appended when tokenizer.json lacks them (faster-whisper's tiny.en does).
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    if not tokenizer_json.is_file():
        raise SlimWhisperError(f"{tokenizer_json.parent} has no tokenizer.json; copy it next to model.bin")
    backend = Tokenizer.from_file(str(tokenizer_json))
    vocab = backend.get_vocab(with_added_tokens=True)
    sot, no_ts = token_id(vocab, SOT), token_id(vocab, NO_TIMESTAMPS)
    id_to_token = {i: t for t, i in vocab.items()}
    extra = [id_to_token[i] for i in range(sot, no_ts + 1) if i in id_to_token]
    tokenizer = WhisperTokenizer(
        tokenizer_object=backend,
        unk_token=EOT,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        extra_special_tokens=extra,
        model_max_length=448,
        normalizer_file=str(normalizer_file) if normalizer_file else None,
    )
    stamps = timestamp_tokens()
    if stamps[0] not in vocab:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in stamps])
    _check_layout(tokenizer, no_ts, vocab_size)
    return tokenizer


def _check_layout(tokenizer: WhisperTokenizer, no_timestamps_id: int, vocab_size: int) -> None:
    """Timestamps must follow <|notimestamps|> and the tokenizer must cover the model exactly."""
    first_stamp = tokenizer.convert_tokens_to_ids(timestamp_tokens()[0])
    if first_stamp != no_timestamps_id + 1 or tokenizer.all_special_ids[-1] != no_timestamps_id:
        raise SlimWhisperError(
            f"tokenizer.json puts <|0.00|> at id {first_stamp}, not right after <|notimestamps|> "
            f"({no_timestamps_id}); timestamps would decode wrongly"
        )
    if len(tokenizer) != vocab_size:
        raise SlimWhisperError(
            f"tokenizer.json has {len(tokenizer)} tokens (with timestamps) but model.bin predicts "
            f"{vocab_size}; the two files come from different Whisper models"
        )


def save_processor(processor: WhisperProcessor, directory: Path) -> None:
    """`save_pretrained` plus normalizer.json, which the tokenizers-backed class does not write."""
    processor.save_pretrained(directory)
    table = getattr(processor.tokenizer, "english_spelling_normalizer", None)
    if table:
        text = json.dumps(table, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (directory / "normalizer.json").write_text(text, encoding="utf-8")


def build_feature_extractor(num_mel_bins: int) -> WhisperFeatureExtractor:
    """Whisper's log-mel front end (80 bins for all but large-v3, which has 128)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=CHUNK_SECONDS,
        n_fft=N_FFT,
    )


def config_token_kwargs(ids: TokenIds, ct2_config: dict[str, Any]) -> dict[str, Any]:
    """Token-id fields of `WhisperConfig` (its defaults are only right for .en vocabularies)."""
    return {
        "decoder_start_token_id": ids.sot,
        "eos_token_id": ids.eot,
        "pad_token_id": ids.eot,
        "bos_token_id": ids.eot,
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, ids.eot])),
    }


def _language_ids(tokenizer: WhisperTokenizer, ids: TokenIds, ct2_config: dict[str, Any]) -> dict[str, int]:
    """<|xx|> token -> id, from the CTranslate2 `lang_ids` or else the ids between SOT and translate."""
    lang_ids = ct2_config.get("lang_ids") or range(ids.sot + 1, ids.task_to_id["translate"])
    tokens = tokenizer.convert_ids_to_tokens(list(lang_ids))
    bad = [t for t in tokens if not (t.startswith("<|") and t.endswith("|>"))]
    if bad:
        raise SlimWhisperError(f"config.json lang_ids point at non-language tokens: {bad[:5]}")
    return dict(zip(tokens, lang_ids))


def _default_alignment_heads(decoder_layers: int, decoder_heads: int) -> list[list[int]]:
    """openai-whisper's fallback: every head in the upper half of the decoder."""
    upper = range(decoder_layers // 2, decoder_layers)
    return [[layer, head] for layer in upper for head in range(decoder_heads)]


def build_generation_config(
    tokenizer: WhisperTokenizer,
    ct2_config: dict[str, Any],
    *,
    is_multilingual: bool,
    max_length: int,
    decoder_layers: int,
    decoder_heads: int,
) -> GenerationConfig:
    """Every field `WhisperGenerationMixin.generate` needs, including timestamp and language ids."""
    from transformers import GenerationConfig

    ids = TokenIds.from_tokenizer(tokenizer)
    fields: dict[str, Any] = {
        **config_token_kwargs(ids, ct2_config),
        "max_length": max_length,
        "no_timestamps_token_id": ids.no_timestamps,
        "prev_sot_token_id": ids.prev_sot,
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads") or []]
        or _default_alignment_heads(decoder_layers, decoder_heads),
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "return_timestamps": False,
        "is_multilingual": is_multilingual,
    }
    if is_multilingual:
        fields["lang_to_id"] = _language_ids(tokenizer, ids, ct2_config)
        fields["task_to_id"] = dict(ids.task_to_id)
        # Without a default task, transformers' generate() omits the task token whenever it detects the
        # language itself, and base then often loops ("So So So ..."); openai-whisper always transcribes.
        fields["task"] = "transcribe"
    return GenerationConfig(**fields)


def complete_generation_config(model: Any, tokenizer: WhisperTokenizer) -> None:
    """Fill a Hugging Face model's generation config from its tokenizer when the Whisper fields are missing.

    Checkpoints saved without `generation_config.json` otherwise fail in `generate`.
    """
    if getattr(model.generation_config, "no_timestamps_token_id", None) is not None:
        return
    config = model.config
    ct2_like = {
        "suppress_ids": list(getattr(config, "suppress_tokens", None) or []),
        "suppress_ids_begin": list(getattr(config, "begin_suppress_tokens", None) or []),
    }
    model.generation_config = build_generation_config(
        tokenizer,
        {k: v for k, v in ct2_like.items() if v},
        is_multilingual=config.vocab_size >= MULTILINGUAL_MIN_VOCAB,
        max_length=config.max_target_positions,
        decoder_layers=config.decoder_layers,
        decoder_heads=config.decoder_attention_heads,
    )
