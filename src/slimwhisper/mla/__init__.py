"""Multi-head latent attention (Whisper-MLA): config, math, modules, convert."""
from .config import MLAConfig
from .convert import convert_mla
from .modules import WhisperMLAAttention, set_decode_mode

__all__ = ["MLAConfig", "WhisperMLAAttention", "convert_mla", "set_decode_mode"]
