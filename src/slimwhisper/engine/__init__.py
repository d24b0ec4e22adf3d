"""A lean transcription engine: static (latent) caches, precomputed logit rules, batched long-form."""
from .cache import StaticEncoderDecoderCache
from .transcriber import Segment, Transcriber, Transcription

__all__ = ["Segment", "StaticEncoderDecoderCache", "Transcriber", "Transcription"]
