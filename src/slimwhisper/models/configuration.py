"""`SlimWhisperConfig`: a `WhisperConfig` that also carries the compression recipe and geometry.

`compression` is a JSON-able dict:
    {"format_version": 1,
     "mla": {"recipe": {...MLAConfig...}, "layers": {fqn: {"latent_dim": int, "kept_dims": [[int]*r]*H}}},
     ...one entry per applied method...}
It holds everything needed to rebuild the exact module shapes, so `from_pretrained` can load strictly.
"""
from __future__ import annotations

from typing import Any

from transformers import WhisperConfig

from ..errors import ConfigVersionError

FORMAT_VERSION = 1


class SlimWhisperConfig(WhisperConfig):
    """Whisper config plus `compression` (see module docstring) and `slimwhisper_source`.

    The class's `model_type` ("slimwhisper") is what is written to config.json and what the Auto
    registry keys on, so a saved model rebuilds as a compressed model. Each *instance* reports
    `model_type == "whisper"`, because transformers' `generate()` and ASR pipeline switch on that
    string to apply Whisper's prompt handling, chunking and timestamps, which compressed models need.
    """

    model_type = "slimwhisper"
    compression: dict[str, Any] | None = None
    slimwhisper_source: dict[str, Any] | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.__dict__["model_type"] = "whisper"
        if self.compression is None:
            self.compression = {"format_version": FORMAT_VERSION}
        version = self.compression.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigVersionError(
                f"this model's compression format version is {version!r}, but this slimwhisper reads "
                f"versions up to {FORMAT_VERSION}; upgrade slimwhisper (pip install -U slimwhisper)"
            )

    @classmethod
    def from_whisper(cls, config: WhisperConfig, compression: dict[str, Any] | None = None) -> SlimWhisperConfig:
        """A compressed-model config with every Whisper setting of `config`."""
        data = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "compression"):
            data.pop(key, None)
        merged = dict(getattr(config, "compression", None) or {"format_version": FORMAT_VERSION})
        merged.update(compression or {})
        return cls(**data, compression=merged)
