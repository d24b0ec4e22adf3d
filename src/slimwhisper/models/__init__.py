"""Hugging Face classes for compressed Whisper; importing this registers them with the Auto classes."""
from .configuration import FORMAT_VERSION, SlimWhisperConfig
from .modeling import SlimWhisperForConditionalGeneration, apply_geometry, register_geometry

__all__ = [
    "FORMAT_VERSION",
    "SlimWhisperConfig",
    "SlimWhisperForConditionalGeneration",
    "apply_geometry",
    "register_geometry",
]
