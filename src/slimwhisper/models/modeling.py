"""`SlimWhisperForConditionalGeneration`: Whisper whose compressed modules are rebuilt from its config.

Construction replays each compression method's geometry (stored in `config.compression`) on a plain
Whisper skeleton, so `from_pretrained` sees exactly the shapes that were saved and can load strictly.
Methods register a builder with `register_geometry(name, builder)`; only the method folders know
how their modules look, only this file knows about the Auto classes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForSpeechSeq2Seq, WhisperForConditionalGeneration

from ..errors import ConfigVersionError, SlimWhisperError
from .configuration import SlimWhisperConfig

GeometryBuilder = Callable[[nn.Module, dict[str, Any]], None]
_GEOMETRY_BUILDERS: dict[str, GeometryBuilder] = {}


def register_geometry(name: str, builder: GeometryBuilder) -> None:
    """Make `compression[name]` rebuildable: `builder(model, spec)` swaps in that method's modules."""
    _GEOMETRY_BUILDERS[name] = builder


def apply_geometry(model: nn.Module, compression: dict[str, Any]) -> None:
    """Swap in every compressed module that `compression` describes (weights uninitialised)."""
    for name, spec in compression.items():
        if name in ("format_version",):
            continue
        if name not in _GEOMETRY_BUILDERS:
            raise ConfigVersionError(
                f"the model uses compression method {name!r}, which this slimwhisper does not know; upgrade slimwhisper"
            )
        _GEOMETRY_BUILDERS[name](model, spec)


class SlimWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    """A Whisper model with compressed modules; generate(), pipelines and save/load work as usual."""

    config_class = SlimWhisperConfig

    def __init__(self, config: SlimWhisperConfig):
        super().__init__(config)
        apply_geometry(self, config.compression or {})

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but every missing, unexpected or mis-shaped tensor is an error.

        A compressed checkpoint whose tensors do not match its own geometry is corrupt or comes from
        another version; loading it leniently would leave random weights in the model.
        """
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as exc:  # transformers raises on shape mismatches after logging a report
            if "mismatch" not in str(exc):
                raise
            raise SlimWhisperError(
                "checkpoint tensors have other shapes than its compression geometry; it is corrupt or was "
                "written by another slimwhisper version; re-run the conversion"
            ) from exc
        problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if problems:
            details = "; ".join(f"{k}: {sorted(map(str, v))[:6]}" for k, v in problems.items())
            raise SlimWhisperError(
                f"checkpoint does not match its compression geometry ({details}); it is corrupt or was "
                f"written by another slimwhisper version; re-run the conversion"
            )
        return (model, info) if want_info else model


AutoConfig.register(SlimWhisperConfig.model_type, SlimWhisperConfig)
AutoModelForSpeechSeq2Seq.register(SlimWhisperConfig, SlimWhisperForConditionalGeneration)
