"""Multi-head latent attention (Whisper-MLA): config, math, modules, convert."""
from .calibrate import AttentionStats
from .config import MLAConfig
from .convert import calibrate_mla, convert_mla
from .modules import WhisperMLAAttention, set_decode_mode

__all__ = ["AttentionStats", "MLAConfig", "calibrate_mla", "WhisperMLAAttention", "convert_mla", "set_decode_mode"]
