"""LiteASR-style low-rank encoder (activation PCA): config, math, modules, calibrate, convert, lite-whisper format."""
from .calibrate import (
    STATS_BUDGET_BYTES,
    STATS_FILE,
    CalibrationWork,
    EncoderStats,
    LinearStats,
    layer_groups,
    work_folder_for,
)
from .config import PRESETS, LowRankConfig, parse_theta
from .convert import calibrate, choose_ranks, convert_lowrank
from .litewhisper import load_lite_whisper, low_rank_config, save_lite_whisper
from .modules import LowRankLinear, WhisperLowRankAttention, WhisperLowRankEncoderLayer

__all__ = [
    "PRESETS",
    "STATS_BUDGET_BYTES",
    "STATS_FILE",
    "CalibrationWork",
    "EncoderStats",
    "LinearStats",
    "LowRankConfig",
    "LowRankLinear",
    "WhisperLowRankAttention",
    "WhisperLowRankEncoderLayer",
    "calibrate",
    "choose_ranks",
    "convert_lowrank",
    "layer_groups",
    "load_lite_whisper",
    "low_rank_config",
    "parse_theta",
    "save_lite_whisper",
    "work_folder_for",
]
