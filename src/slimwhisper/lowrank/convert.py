"""Compress encoder linears into `LowRankLinear`s (LiteASR) and rebuild them from saved geometry.

`convert_lowrank(model, LowRankConfig)` measures (or reuses) output statistics of every target
linear on calibration audio, picks each rank from the PCA energy, computes the factors in float64
(`math.py`), casts them once to the model's dtype, and returns a `SlimWhisperForConditionalGeneration`
whose config records `compression["lowrank"] = {"recipe": ..., "layers": {fqn: rank}}`. Layers
that stay dense are absent from "layers". Other methods' entries (e.g. "mla") are kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import CalibrationSource, calibration_audio, feature_batches
from ..errors import SlimWhisperError
from ..models import SlimWhisperForConditionalGeneration, register_geometry
from ..models.rebuild import rebuild
from .calibrate import STATS_FILE, EncoderStats, batches_needed, collect_linear_stats, encoder_fingerprint
from .config import LowRankConfig
from .math import energy_rank, fixed_rank, pca_factors
from .modules import LowRankLinear, WhisperLowRankAttention

ENCODER_LAYERS = "model.encoder.layers"


def find_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Fully-qualified name -> nn.Linear for every target linear of every encoder layer."""
    from ..mla.modules import WhisperMLAAttention

    found: dict[str, nn.Linear] = {}
    for i, layer in enumerate(model.get_submodule(ENCODER_LAYERS)):
        for target in targets:
            if target.startswith("self_attn.") and isinstance(layer.self_attn, WhisperMLAAttention):
                raise SlimWhisperError(
                    f"{ENCODER_LAYERS}.{i}.self_attn is an MLA module; compress the encoder before converting "
                    "encoder attention to MLA, or leave the attention targets out"
                )
            module = layer.get_submodule(target)
            if not isinstance(module, nn.Linear):
                raise SlimWhisperError(f"{ENCODER_LAYERS}.{i}.{target} is already compressed; use the original model")
            found[f"{ENCODER_LAYERS}.{i}.{target}"] = module
    return found


def calibrate(
    model: nn.Module,
    audio_source: CalibrationSource = None,
    config: LowRankConfig | None = None,
    *,
    limit: int | None = 100,
    batch_size: int = 4,
    progress: bool = True,
) -> EncoderStats:
    """Run the unmodified encoder over calibration audio and return streamed output statistics.

    `audio_source`: a path (file, folder, any dataset layout the project reads), a list of paths or
    16 kHz arrays, or None for the bundled clips; at most `limit` recordings (default 100), each
    contributing every 30-s window. Save the result with `.save(path)` to reuse it.
    """
    config = config or LowRankConfig()
    targets = find_linears(model, config.targets)
    windows = calibration_audio(audio_source, limit=limit)
    batches = feature_batches(windows, model.config.num_mel_bins, batch_size)
    stats = collect_linear_stats(model, batches, targets, batches_needed(len(windows), batch_size), progress)
    stats.extra["source"] = "bundled" if audio_source is None else str(audio_source)[:200]
    stats.extra["recordings_limit"] = str(limit)
    return stats


def choose_ranks(model: nn.Module, config: LowRankConfig, stats: EncoderStats) -> dict[str, int]:
    """fqn -> rank for every target that gets factorised (dense ones are left out)."""
    ranks: dict[str, int] = {}
    for name, linear in find_linears(model, config.targets).items():
        target = name.split(".", 4)[-1]
        if config.rank is not None:
            k = fixed_rank(config.rank, linear.in_features, linear.out_features, config.dense_if_no_saving)
        else:
            values = stats.basis(name)[0]
            k = energy_rank(values, config.theta_for(target), config.granule, linear.in_features,
                            linear.out_features, config.energy, config.dense_if_no_saving)
        if k is not None:
            ranks[name] = k
    return ranks


def _resolve_stats(model: nn.Module, config: LowRankConfig, calibration: Any, limit, batch_size, progress):
    if isinstance(calibration, EncoderStats):
        stats = calibration
    elif isinstance(calibration, (str, Path)) and (
        str(calibration).endswith(".safetensors") or (Path(calibration) / STATS_FILE).is_file()
    ):
        stats = EncoderStats.load(calibration)
    else:
        return calibrate(model, calibration, config, limit=limit, batch_size=batch_size, progress=progress)
    if stats.fingerprint and stats.fingerprint != encoder_fingerprint(model):
        raise SlimWhisperError("these calibration statistics were measured on another encoder; re-run calibration")
    missing = sorted(set(find_linears(model, config.targets)) - set(stats.layers))
    if missing:
        raise SlimWhisperError(f"calibration statistics do not cover {missing[:3]}; re-run calibration")
    return stats


def convert_lowrank(
    model: nn.Module,
    config: LowRankConfig,
    calibration: CalibrationSource | EncoderStats | str | Path = None,
    *,
    calibration_limit: int | None = 100,
    batch_size: int = 4,
    progress: bool = True,
    stats_out: str | Path | None = None,
) -> SlimWhisperForConditionalGeneration:
    """Return a copy of `model` whose encoder linears are low-rank as `config` says.

    Args:
        model: a (Slim)WhisperForConditionalGeneration (may already have MLA modules); left unchanged.
        config: the recipe.
        calibration: audio (path, list of paths/arrays, None = bundled clips), an `EncoderStats`, or
            the path of a saved statistics file (or a directory holding `encoder_stats.safetensors`).
        stats_out: also save the statistics here (a file path).
    """
    if "lowrank" in (getattr(model.config, "compression", None) or {}):
        raise SlimWhisperError("this model already has a low-rank encoder; compress the original model instead")
    linears = find_linears(model, config.targets)
    # fixed ranks need the PCA basis too, so statistics are always measured
    stats = _resolve_stats(model, config, calibration, calibration_limit, batch_size, progress)
    if stats_out is not None:
        stats.save(stats_out)
    ranks = choose_ranks(model, config, stats)
    new_state: dict[str, torch.Tensor] = {}
    for name, k in ranks.items():
        linear = linears[name]
        s = stats.layers[name]
        first, second, bias = pca_factors(linear.weight.detach(), linear.bias, s.mean(), None, k, stats.basis(name))
        like = linear.weight
        new_state[f"{name}.down.weight"] = first.to(dtype=like.dtype, device=like.device)
        new_state[f"{name}.up.weight"] = second.to(dtype=like.dtype, device=like.device)
        new_state[f"{name}.up.bias"] = bias.to(dtype=like.dtype, device=like.device)
    spec = {"recipe": config.to_dict(), "layers": ranks, "calibration_windows": stats.windows}
    return rebuild(model, {"lowrank": spec}, new_state, replaced=tuple(ranks))


def build_geometry(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap in uninitialised low-rank modules with the saved ranks (registered as the "lowrank" builder)."""
    attention: dict[str, dict[str, int]] = {}
    for name, rank in spec.get("layers", {}).items():
        if not isinstance(rank, int) or rank <= 0:
            raise SlimWhisperError(f"{name}: rank must be a positive integer, got {rank!r}")
        parent_name, attr = name.rsplit(".", 1)
        if parent_name.endswith(".self_attn"):
            attention.setdefault(parent_name, {})[attr] = rank
            continue
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        setattr(parent, attr, LowRankLinear(old.in_features, old.out_features, rank))
    for name, ranks in attention.items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, WhisperLowRankAttention.like(getattr(parent, attr), ranks))


register_geometry("lowrank", build_geometry)
