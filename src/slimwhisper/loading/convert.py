"""Turn a CTranslate2 / faster-whisper directory into a Hugging Face Whisper model and processor."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SlimWhisperError
from ..tokens import TokenIds
from .ct2 import read_ct2, to_float32
from .mapping import WhisperDims, infer_dims, map_to_hf
from .processor import (
    MULTILINGUAL_MIN_VOCAB,
    build_feature_extractor,
    build_generation_config,
    build_tokenizer,
    config_token_kwargs,
    english_normalizer_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

CONVERTER_VERSION = 2  # bump when the conversion output changes, so old cache entries are ignored
WHISPER_SPEC = "WhisperSpec"


@dataclass(frozen=True)
class CT2Files:
    """Where a CTranslate2 Whisper model lives: `model.bin` (maybe split in parts) and its side files."""

    weights: tuple[Path, ...]  # model.bin, or its parts in order
    directory: Path  # holds config.json and tokenizer.json

    @classmethod
    def from_directory(cls, directory: Path) -> CT2Files:
        """The usual faster-whisper layout: everything in one folder."""
        return cls((directory / "model.bin",), directory)

    def side_files(self) -> tuple[Path, ...]:
        """The non-weight inputs of the conversion (they feed the tokenizer and generation config)."""
        candidates = (self.directory / "config.json", self.directory / "tokenizer.json")
        return tuple(p for p in candidates if p.exists())


def _read_ct2_config(directory: Path) -> dict[str, Any]:
    """faster-whisper's config.json (suppress ids, language ids, alignment heads); may be absent."""
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimWhisperError(f"{path} is not valid JSON ({exc}); reinstall the model files") from exc


def whisper_config(dims: WhisperDims, token_kwargs: dict[str, Any]) -> WhisperConfig:
    """A `WhisperConfig` from measured dims plus the vocabulary's special ids."""
    from transformers import WhisperConfig

    return WhisperConfig(**dims.as_config_kwargs(), **token_kwargs)


def build_model(config: WhisperConfig, state: dict[str, torch.Tensor]) -> WhisperForConditionalGeneration:
    """Instantiate on the meta device and adopt `state` with strict key and shape checks.

    Skipping random initialisation saves seconds and a second copy of the weights.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SlimWhisperError(f"converted weights do not fit a Whisper model: {exc}") from exc
    model.tie_weights()
    return model.eval()


def convert_ct2(files: CT2Files) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Read, de-quantise and map a CTranslate2 Whisper checkpoint; build its processor.

    Raises:
        SlimWhisperError: the files are incomplete, corrupt, or not a Whisper model.
    """
    from transformers import WhisperProcessor

    checkpoint = read_ct2(files.weights)
    if checkpoint.spec and checkpoint.spec != WHISPER_SPEC:
        raise SlimWhisperError(
            f"{files.weights[0]} holds a CTranslate2 {checkpoint.spec}, not a Whisper model"
        )
    tensors, scalars = to_float32(checkpoint)
    dims = infer_dims(tensors, checkpoint.aliases, scalars)
    state = map_to_hf(tensors, checkpoint.aliases, dims)
    del checkpoint, tensors  # drop the file mappings before the model holds its own copy

    ct2_config = _read_ct2_config(files.directory)
    tokenizer_json = files.directory / "tokenizer.json"
    tokenizer = build_tokenizer(tokenizer_json, dims.vocab_size, english_normalizer_file())
    token_kwargs = config_token_kwargs(TokenIds.from_tokenizer(tokenizer), ct2_config)
    model = build_model(whisper_config(dims, token_kwargs), state)
    model.generation_config = build_generation_config(
        tokenizer,
        ct2_config,
        is_multilingual=dims.vocab_size >= MULTILINGUAL_MIN_VOCAB,
        max_length=dims.max_target_positions,
        decoder_layers=dims.decoder_layers,
        decoder_heads=dims.decoder_attention_heads,
    )
    features = build_feature_extractor(dims.num_mel_bins)
    processor = WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)
    return model, processor
