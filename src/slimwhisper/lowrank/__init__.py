"""LiteASR-style low-rank encoder (activation PCA): config, math, modules, calibrate, convert, lite-whisper format."""
from .calibrate import STATS_FILE, EncoderStats, LinearStats
from .config import PRESETS, LowRankConfig, parse_theta
from .convert import calibrate, choose_ranks, convert_lowrank
from .litewhisper import load_lite_whisper, low_rank_config, save_lite_whisper
from .modules import LowRankLinear, WhisperLowRankAttention

__all__ = [
    "PRESETS",
    "STATS_FILE",
    "EncoderStats",
    "LinearStats",
    "LowRankConfig",
    "LowRankLinear",
    "WhisperLowRankAttention",
    "calibrate",
    "choose_ranks",
    "convert_lowrank",
    "load_lite_whisper",
    "low_rank_config",
    "parse_theta",
    "save_lite_whisper",
]
