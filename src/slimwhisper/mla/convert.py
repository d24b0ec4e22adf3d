"""Convert Whisper attention modules to `WhisperMLAAttention` and rebuild them from saved geometry.

`convert_mla(model, MLAConfig)` is the only place that touches the model tree for this method: it
finds the target modules, measures calibration statistics when the recipe needs them, computes the
new weights (small pure functions in `math.py`), and returns a `SlimWhisperForConditionalGeneration`
whose config records the recipe and the exact geometry of every converted module.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..calibration import CalibrationSource, calibration_audio, feature_batches
from ..errors import SlimWhisperError
from ..memory import module_cached_numbers
from ..models import SlimWhisperForConditionalGeneration, register_geometry
from ..models.rebuild import rebuild as _rebuild
from .allocate import greedy_widths, tail_error
from .calibrate import AttentionStats, collect_attention_stats, logit_sensitivity
from .config import MLAConfig
from .math import factorize_kv, head_permutation, kept_dim_indices, kv_spectrum, split_head_dims
from .modules import WhisperMLAAttention

# Where each module kind lives in a HF Whisper model ("{i}" = layer index).
MODULE_PATHS = {
    "decoder_self": ("model.decoder.layers", "self_attn"),
    "decoder_cross": ("model.decoder.layers", "encoder_attn"),
    "encoder_self": ("model.encoder.layers", "self_attn"),
}


def target_names(config, modules: tuple[str, ...]) -> list[tuple[str, str]]:
    """(fully-qualified name, kind) of every module a conversion of `modules` touches, from the config alone."""
    counts = {"model.decoder.layers": config.decoder_layers, "model.encoder.layers": config.encoder_layers}
    return [(f"{MODULE_PATHS[kind][0]}.{i}.{MODULE_PATHS[kind][1]}", kind) for kind in modules
            for i in range(counts[MODULE_PATHS[kind][0]])]


# Greedy widths grow in steps of this many latent units: small enough to follow the spectra, and a
# multiple of 8 keeps the latent GEMMs aligned for fp16 kernels.
GRANULE = 8
CACHE_ITEMSIZE = 2  # fp16, the cache dtype `memory.kv_cache_bytes` prices by default
# Recordings the sensitivity of each module is measured on: it costs one teacher-forced pass per module,
# and a few clips already rank the modules (their KLs differ by tens of times on tiny.en).
SENSITIVITY_CLIPS = 16


def find_targets(model: nn.Module, modules: tuple[str, ...]) -> dict[str, tuple[WhisperAttention, str]]:
    """Fully-qualified name -> (attention module, kind) for every module kind requested."""
    targets: dict[str, tuple[WhisperAttention, str]] = {}
    for kind in modules:
        layers_path, attr = MODULE_PATHS[kind]
        for i, layer in enumerate(model.get_submodule(layers_path)):
            attn = getattr(layer, attr)
            if isinstance(attn, WhisperMLAAttention) or not isinstance(attn, WhisperAttention):
                raise SlimWhisperError(f"{layers_path}.{i}.{attr} is already converted; convert the original model")
            if not all(type(getattr(attn, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj")):
                raise SlimWhisperError(
                    f"{layers_path}.{i}.{attr} has low-rank projections; apply MLA to it before compressing the encoder"
                )
            targets[f"{layers_path}.{i}.{attr}"] = (attn, kind)
    return targets


def mla_state(
    attn: WhisperAttention,
    kept_idx: torch.Tensor,
    latent_dim: int,
    factorization: str,
    second_moment: torch.Tensor | None,
    damping: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weights of the MLA module that replaces `attn` (names relative to the module)."""
    head_dim = attn.head_dim
    perm = head_permutation(kept_idx, head_dim)
    kept_rows, comp_rows = split_head_dims(kept_idx, head_dim)
    w_k, w_v = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
    moment = damped_moment(second_moment, damping) if factorization == "activation" else None
    down, up_k, up_v = factorize_kv(w_k[comp_rows], w_v, latent_dim, moment, split=factorization == "split")
    state = {
        "q_proj.weight": attn.q_proj.weight.detach()[perm],
        "kv_down.weight": down,
        "up_k.weight": up_k,
        "up_v.weight": up_v,
        "out_proj.weight": attn.out_proj.weight.detach(),
    }
    if kept_rows.numel():
        state["kept_proj.weight"] = w_k[kept_rows]
    for name, bias in (("q_proj", attn.q_proj.bias), ("up_v", attn.v_proj.bias), ("out_proj", attn.out_proj.bias)):
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()[perm] if name == "q_proj" else bias.detach()
    like = attn.q_proj.weight
    return {k: v.to(dtype=like.dtype, device=like.device) for k, v in state.items()}


def damped_moment(second_moment: torch.Tensor | None, damping: float) -> torch.Tensor:
    """E[x x^T] plus `damping` times its mean eigenvalue: the weighting every activation-aware step uses."""
    if second_moment is None:
        raise SlimWhisperError("activation-aware factorisation needs calibration audio")
    ridge = damping * second_moment.diagonal().mean()
    return second_moment + ridge * torch.eye(second_moment.shape[0], dtype=second_moment.dtype)


def cached_positions(model_config, kind: str) -> int:
    """Positions one utterance fills in a module's cache: 448 decoder tokens for decoder self attention,
    1500 encoder frames for cross and encoder self attention."""
    return model_config.max_target_positions if kind == "decoder_self" else model_config.max_source_positions


def cache_budget(
    targets: dict[str, tuple[WhisperAttention, str]], config: MLAConfig, model_config
) -> tuple[int, dict[str, int]]:
    """(bytes left for the latents, bytes of one latent unit per module) under `config.kv_reduction`.

    The budget is (1 - kv_reduction) of what the converted modules cache as MHA for one utterance;
    kept key dims are paid first, since their width is fixed by the recipe.
    """
    full, kept, unit = 0, 0, {}
    for name, (attn, kind) in targets.items():
        unit[name] = cached_positions(model_config, kind) * CACHE_ITEMSIZE
        full += unit[name] * module_cached_numbers(attn.embed_dim)
        kept += unit[name] * attn.num_heads * config.kept_dims
    return int((1.0 - config.kv_reduction) * full) - kept, unit


def weighted_spectra(
    model: nn.Module,
    targets: dict[str, tuple[WhisperAttention, str]],
    kept: dict[str, torch.Tensor],
    config: MLAConfig,
    stats: dict[str, AttentionStats],
    batches: list[torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per module, the spectrum its conversion truncates and the measured weight of its relative error.

    The weight is the output KL on calibration audio when that module alone is cut to the uniform
    width, per unit of the relative error that width leaves. Without it the spectra treat an error in
    the first decoder layer like one in the last, and starving the first layer broke transcripts that
    uniform widths kept.
    """
    spectra, replacements, probe = {}, {}, {}
    for name, (attn, _kind) in targets.items():
        comp_rows = split_head_dims(kept[name], attn.head_dim)[1]
        activation = config.factorization == "activation"
        moment = damped_moment(stats[name].second_moment(), config.damping) if activation else None
        w_k, w_v = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
        spectra[name] = kv_spectrum(w_k[comp_rows], w_v, moment)
        probe[name] = config.latent_width(attn.embed_dim, attn.num_heads)
        down, up_k, up_v = factorize_kv(w_k[comp_rows], w_v, probe[name], moment)
        new_k = w_k.double().clone()
        new_k[comp_rows] = up_k @ down
        replacements[name] = (new_k, up_v @ down)
    kl = logit_sensitivity(model, batches, targets, replacements)
    floor = torch.finfo(torch.float64).tiny  # a probe at full width leaves no error: its KL alone weighs it
    return spectra, {n: kl[n] / max(float(tail_error(spectra[n])[probe[n]]), floor) for n in targets}


def greedy_allocation(
    model: nn.Module,
    targets: dict[str, tuple[WhisperAttention, str]],
    kept: dict[str, torch.Tensor],
    config: MLAConfig,
    stats: dict[str, AttentionStats],
    batches: list[torch.Tensor],
) -> dict[str, int]:
    """Latent width per module: the cache budget spent by `greedy_widths` on the weighted spectra."""
    budget, unit = cache_budget(targets, config, model.config)
    spectra, weights = weighted_spectra(model, targets, kept, config, stats, batches)
    return greedy_widths(spectra, unit, budget, GRANULE, weights=weights)


def calibrate_mla(
    model: nn.Module,
    modules: tuple[str, ...],
    calibration: CalibrationSource = None,
    *,
    limit: int | None = 100,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, AttentionStats]:
    """Input statistics of the attention modules of `modules` kinds on calibration audio.

    The result can be passed to `convert_mla(..., calibration=stats)` for any number of recipes on
    the same model (they depend on the audio and the original weights only).
    """
    targets = find_targets(model, modules)
    windows = calibration_audio(calibration, limit=limit)
    batches = feature_batches(windows, model.config.num_mel_bins, batch_size)
    return collect_attention_stats(model, batches, targets, progress=progress)


def check_greedy(targets: dict, config: MLAConfig, model_config: Any, calibration: Any) -> None:
    """Refuse, before calibrating, a budget below the smallest latents or statistics without audio."""
    budget, unit = cache_budget(targets, config, model_config)
    if budget < GRANULE * sum(unit.values()):
        raise SlimWhisperError(f"kv_reduction={config.kv_reduction} leaves less than {GRANULE} latent units per "
                               "module; lower --kv-reduction or --kept-dims")
    if isinstance(calibration, dict):
        raise SlimWhisperError("allocation 'greedy' measures each module's effect on calibration audio; pass "
                               "audio (or nothing for the bundled clips), not precomputed statistics")


def convert_mla(
    model: nn.Module,
    config: MLAConfig,
    calibration: CalibrationSource | dict[str, AttentionStats] = None,
    *,
    calibration_limit: int | None = 100,
    batch_size: int = 8,
    progress: bool = True,
) -> SlimWhisperForConditionalGeneration:
    """Return a copy of `model` with the attention modules in `config.modules` converted to MLA.

    Args:
        model: a (Slim)WhisperForConditionalGeneration; left unchanged.
        config: the recipe.
        calibration: audio for activation-aware factorisation and "2norm" selection: a path, a list
            of paths or arrays, precomputed stats, or None for the bundled clips. Greedy allocation
            measures module sensitivities on the audio itself, so it refuses precomputed stats.
        calibration_limit: at most this many recordings are used.
    """
    mc = model.config
    if "mla" in (getattr(mc, "compression", None) or {}):
        raise SlimWhisperError("this model already has MLA modules; convert the original model instead")
    targets = find_targets(model, config.modules)
    widths = {name: config.latent_width(attn.embed_dim, attn.num_heads) for name, (attn, _) in targets.items()}
    if config.allocation == "greedy":
        check_greedy(targets, config, mc, calibration)
    stats: dict[str, AttentionStats] = {}
    if config.needs_calibration:
        if isinstance(calibration, dict):
            stats = calibration
            missing = sorted(set(targets) - set(stats))
            if missing:
                raise SlimWhisperError(f"calibration statistics do not cover {missing[:3]}; calibrate these modules")
        else:
            stats = calibrate_mla(model, config.modules, calibration, limit=calibration_limit,
                                  batch_size=batch_size, progress=progress)
    kept_idx = {
        name: kept_dim_indices(config.selection, attn.num_heads, attn.head_dim, config.kept_dims,
                               stats[name].qk_score(attn.num_heads) if name in stats else None)
        for name, (attn, _kind) in targets.items()
    }
    if config.allocation == "greedy":
        windows = calibration_audio(calibration, limit=min(calibration_limit or SENSITIVITY_CLIPS, SENSITIVITY_CLIPS))
        batches = list(feature_batches(windows, mc.num_mel_bins, batch_size))
        widths = greedy_allocation(model, targets, kept_idx, config, stats, batches)
    layers: dict[str, Any] = {}
    new_state: dict[str, torch.Tensor] = {}
    for name, (attn, _kind) in targets.items():
        d_c = widths[name]  # validated before calibrating, so impossible ranks fail fast
        kept = kept_idx[name]
        moment = stats[name].second_moment() if name in stats else None
        for key, value in mla_state(attn, kept, d_c, config.factorization, moment, config.damping).items():
            new_state[f"{name}.{key}"] = value
        layers[name] = {"latent_dim": d_c, "kept_dims": kept.tolist()}
    spec = {"recipe": config.to_dict(), "layers": layers}
    return _rebuild(model, {"mla": spec}, new_state, replaced=tuple(targets))


def build_geometry(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap in uninitialised MLA modules with the saved shapes (registered as the "mla" builder)."""
    for name, geometry in spec.get("layers", {}).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        kept = geometry["kept_dims"]
        if len(kept) != old.num_heads or len({len(row) for row in kept}) > 1:
            raise SlimWhisperError(f"{name}: kept_dims must list as many dims for each of {old.num_heads} heads")
        setattr(parent, attr, WhisperMLAAttention.like(old, len(kept[0]), int(geometry["latent_dim"])))


register_geometry("mla", build_geometry)
