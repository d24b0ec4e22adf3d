"""Recovery fine-tuning of compressed models against a paired, identically trained control.

    from slimwhisper.recovery import FinetuneConfig, finetune
    finetune(slim, "train/manifest.jsonl", FinetuneConfig(), processor=processor, teacher=original)

`recover(RecoveryJob(...))` is the whole `slimwhisper finetune` command (both arms, files, resume).
"""
from __future__ import annotations

from .config import FinetuneConfig
from .losses import combined_loss, cross_entropy, distillation, lr_factor
from .pipeline import RecoveryJob, recover
from .train import TrainResult, converted_paths, finetune, select_trainable

__all__ = [
    "FinetuneConfig",
    "RecoveryJob",
    "TrainResult",
    "combined_loss",
    "converted_paths",
    "cross_entropy",
    "distillation",
    "finetune",
    "lr_factor",
    "recover",
    "select_trainable",
]
