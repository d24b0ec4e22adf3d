"""Compress encoder linears into `LowRankLinear`s (LiteASR) and rebuild them from saved geometry.

`convert_lowrank(model, LowRankConfig)` measures (or reuses) output statistics of every target
linear on calibration audio (layer groups in bounded memory, resumable from a work folder: see
`calibrate.py`), picks each rank from the PCA energy (or shares a FLOP budget out: one rank for
all, or greedily by the encoder error each linear's truncation causes on the calibration audio),
computes the factors in float64 (`math.py`), casts them once to the model's dtype, and returns a
`SlimWhisperForConditionalGeneration` whose config records `compression["lowrank"] = {"recipe": ...,
"layers": {fqn: rank}, "linear_flops_kept": share}` (and "calibration": the audio's absolute path, when it was
given as a path). Layers that stay dense are absent from "layers".
With an attention budget the heads of some layers are then narrowed (`heads.py`) and the spec also holds
"head_dims": {attention fqn: dim} and "attention_flops_kept".
Other methods' entries (e.g. "mla") are kept.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationSource
from ..errors import SlimWhisperError
from ..models import SlimWhisperForConditionalGeneration, register_geometry
from ..models.rebuild import rebuild
from .calibrate import (
    STATS_BUDGET_BYTES,
    STATS_FILE,
    CalibrationWork,
    EncoderStats,
    FileLayers,
    LinearStats,
    RoleProbe,
    audio_items,
    audio_key,
    encoder_fingerprint,
    measure_stats,
    probe_errors,
    probe_windows,
)
from .config import PROBE_WINDOWS, ROLE_PROBE_WINDOWS, ROLES, LowRankConfig
from .heads import choose_head_dims, linear_cost, narrowed_state
from .math import (
    budget_ranks,
    energy_rank,
    fixed_rank,
    flops_kept,
    largest_saving_rank,
    pca_factors,
    rank_options,
    role_costs,
    role_options,
    search_roles,
    uniform_budget_ranks,
)
from .modules import LowRankLinear, WhisperLowRankAttention, WhisperLowRankEncoderLayer

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


def work_settings(model: nn.Module, targets: dict[str, nn.Linear], items: list, batch_size: int,
                  audio_weight: float | None = None) -> dict[str, Any]:
    """What a calibration work folder's statistics depend on: a folder made otherwise is not reused."""
    return {"fingerprint": encoder_fingerprint(model), "audio": audio_key(items), "recordings": len(items),
            "batch_size": batch_size, "targets": sorted(targets), "num_mel_bins": model.config.num_mel_bins,
            "audio_weight": audio_weight}


@contextmanager
def _measured(model: nn.Module, source: CalibrationSource, config: LowRankConfig, work_dir: str | Path | None,
              limit: int | None, batch_size: int, budget_bytes: int, progress: bool) -> Iterator[EncoderStats]:
    """Statistics measured into `work_dir` (resumable), or into a temporary folder removed afterwards."""
    targets = find_linears(model, config.targets)
    items = audio_items(source, limit)
    settings = work_settings(model, targets, items, batch_size, config.audio_weight)
    holder = nullcontext(work_dir) if work_dir is not None else tempfile.TemporaryDirectory(prefix="slimwhisper-")
    with holder as folder:
        work = CalibrationWork(folder, settings)
        stats = measure_stats(model, items, targets, work, batch_size=batch_size, budget_bytes=budget_bytes,
                              progress=progress, audio_weight=config.audio_weight)
        stats.extra["audio_weight"] = str(config.audio_weight)
        stats.extra["source"] = "bundled" if source is None else str(source)[:200]
        stats.extra["recordings_limit"] = str(limit)
        yield stats


def calibrate(
    model: nn.Module,
    audio_source: CalibrationSource = None,
    config: LowRankConfig | None = None,
    *,
    limit: int | None = 100,
    batch_size: int = 4,
    progress: bool = True,
    work_dir: str | Path | None = None,
    budget_bytes: int = STATS_BUDGET_BYTES,
) -> EncoderStats:
    """Run the unmodified encoder over calibration audio and return streamed output statistics.

    `audio_source`: a path (file, folder, any dataset layout the project reads), a list of paths or
    16 kHz arrays, or None for the bundled clips; at most `limit` recordings (default 100), each
    contributing every 30-s window. Layers are measured in groups whose sums fit `budget_bytes`.
    With `work_dir` the result reads from that folder (resumable, nothing held in memory); without
    it the sums are returned in memory. Save the result with `.save(path)` to reuse it.
    """
    config = config or LowRankConfig()
    with _measured(model, audio_source, config, work_dir, limit, batch_size, budget_bytes, progress) as stats:
        return stats if work_dir is not None else stats.in_memory()


def _rank_for(name: str, linear: nn.Linear, config: LowRankConfig, stats: EncoderStats,
              layer: LinearStats | None = None) -> int | None:
    """The rank of one target linear, or None when it stays dense."""
    if config.rank is not None:
        return fixed_rank(config.rank, linear.in_features, linear.out_features, config.dense_if_no_saving)
    values = stats.basis(name, layer)[0]
    return energy_rank(values, config.theta_for(name.split(".", 4)[-1]), config.granule, linear.in_features,
                       linear.out_features, config.energy, config.dense_if_no_saving)


def allocate_budget(linears: dict[str, nn.Linear], config: LowRankConfig, stats: EncoderStats,
                    errors: dict[str, dict[int, float]] | None = None) -> dict[str, int | None]:
    """Ranks for `config.budget` across all target linears under the "uniform" or "greedy" allocation (`errors`
    from `probe_errors`; without them each linear's own share of lost energy). Each spectrum is read and
    reduced to its eigenvalues one linear at a time, so a file-backed large model never holds more than one
    covariance. The "roles" allocation runs the encoder, so it is `role_ranks`."""
    if config.allocation == "uniform":
        return uniform_budget_ranks({n: (m.in_features, m.out_features) for n, m in linears.items()}, config.budget,
                                    config.granule)
    spectra = {}
    for name, linear in linears.items():
        values = torch.linalg.eigvalsh(stats.layers[name].covariance()).flip(0)
        spectra[name] = (values, linear.in_features, linear.out_features)
    return budget_ranks(spectra, config.budget, config.granule, errors)


def _role_members(linears: dict[str, nn.Linear]) -> dict[str, list[str]]:
    members = {role: [n for n in linears if n.split(".", 4)[-1] in targets] for role, targets in ROLES.items()}
    return {role: names for role, names in members.items() if names}


def _role_rank_map(linears: dict[str, nn.Linear], members: dict[str, list[str]], positions: dict[str, int],
                   options: dict[str, list[int | None]]) -> dict[str, int | None]:
    """fqn -> rank (None = dense) for one option position per role (`math.role_options`)."""
    ranks: dict[str, int | None] = {}
    for role, p in positions.items():
        k = options[role][p]
        for name in members[role]:
            linear = linears[name]
            ranks[name] = None if k is None else fixed_rank(k, linear.in_features, linear.out_features)
    return ranks


def role_ranks(model: nn.Module, linears: dict[str, nn.Linear], config: LowRankConfig, stats: EncoderStats,
               audio: Any, limit: int | None, progress: bool) -> dict[str, int | None]:
    """Ranks for `config.budget` under the "roles" allocation: one rank per role in every layer, the combination
    that fits the budget with the least weighted encoder-output error on a few windows of `audio` (the bundled
    clips when None), every target truncated together (`RoleProbe`), searched coarse to fine."""
    members = _role_members(linears)
    shapes = {role: [(linears[n].in_features, linears[n].out_features) for n in names]
              for role, names in members.items()}
    options = {role: role_options(s, config.granule) for role, s in shapes.items()}
    costs = {role: role_costs(shapes[role], options[role]) for role in members}
    largest = {n: max(rank_options(m.in_features, m.out_features, config.granule), default=0)
               for n, m in linears.items()}
    features, weights = probe_windows(model, audio_items(audio, limit), ROLE_PROBE_WINDOWS, config.audio_weight)
    probe = RoleProbe(model, linears, stats, largest, features, weights)
    with tqdm(desc="searching ranks", unit="combination", disable=not progress) as bar:
        def evaluate(positions: dict[str, int]) -> float:
            bar.update()
            return probe.error(_role_rank_map(linears, members, positions, options))

        best = search_roles(costs, config.budget * sum(c[-1] for c in costs.values()), evaluate)
    return _role_rank_map(linears, members, best, options)


def _allocate(model: nn.Module, linears: dict[str, nn.Linear], config: LowRankConfig, stats: EncoderStats,
              calibration: Any, limit: int | None, progress: bool) -> dict[str, int | None] | None:
    """Ranks for a budget recipe (None for threshold and fixed-rank ones). The allocations that measure errors
    probe the calibration audio, or the bundled clips when only statistics were given."""
    if config.budget is None:
        return None
    audio = _probe_audio(calibration)
    if config.allocation == "roles":
        return role_ranks(model, linears, config, stats, audio, limit, progress)
    errors = None
    if config.allocation == "greedy":
        # the same frame weights as the calibration: a 5-s clip's window is mostly padding, which should
        # not decide which linear keeps its rank
        features, weights = probe_windows(model, audio_items(audio, limit), PROBE_WINDOWS, config.audio_weight)
        errors = probe_errors(model, linears, stats, features, config.granule, progress, weights)
    return allocate_budget(linears, config, stats, errors)


def choose_ranks(model: nn.Module, config: LowRankConfig, stats: EncoderStats, calibration: Any = None,
                 limit: int | None = 100, progress: bool = False) -> dict[str, int]:
    """fqn -> rank for every target that gets factorised (dense ones are left out). Budget allocations that
    measure errors run the encoder on `calibration` audio (default: the bundled clips)."""
    linears = find_linears(model, config.targets)
    allocated = _allocate(model, linears, config, stats, calibration, limit, progress)
    ranks: dict[str, int] = {}
    for name, linear in linears.items():
        k = allocated[name] if allocated is not None else _rank_for(name, linear, config, stats)
        if k is not None:
            ranks[name] = k
    return ranks


def _check_stats(model: nn.Module, config: LowRankConfig, stats: EncoderStats) -> EncoderStats:
    if stats.fingerprint and stats.fingerprint != encoder_fingerprint(model):
        raise SlimWhisperError("these calibration statistics were measured on another encoder; re-run calibration")
    weighted = stats.extra.get("audio_weight", "None")  # files from before the weighting weighed every frame 1
    if weighted != str(config.audio_weight):
        raise SlimWhisperError(f"these statistics give audio frames a weight of {weighted}, the recipe asks for "
                               f"{config.audio_weight}; pass --audio-weight {weighted} or calibrate again")
    missing = sorted(set(find_linears(model, config.targets)) - set(stats.layers))
    if missing:
        raise SlimWhisperError(f"calibration statistics do not cover {missing[:3]}; re-run calibration")
    return stats


def _stats_for(model: nn.Module, config: LowRankConfig, calibration: Any, work_dir, limit, batch_size,
               budget_bytes, progress):
    """A context giving the statistics: given, loaded from a file, or measured (into `work_dir` if any)."""
    if isinstance(calibration, EncoderStats):
        return nullcontext(_check_stats(model, config, calibration))
    if _is_stats_file(calibration):
        return nullcontext(_check_stats(model, config, EncoderStats.load(calibration)))
    return _measured(model, calibration, config, work_dir, limit, batch_size, budget_bytes, progress)


def _probe_audio(calibration: Any) -> Any:
    """The audio that probes measure errors on: the calibration audio, or None (the bundled clips) when only
    statistics were given."""
    return None if isinstance(calibration, EncoderStats) or _is_stats_file(calibration) else calibration


def _audio_path(calibration: Any) -> str | None:
    """The absolute path of calibration audio given as one file or folder (None for clips, statistics, bundled)."""
    if not isinstance(calibration, (str, Path)) or _is_stats_file(calibration):
        return None
    return str(Path(calibration).expanduser().resolve())


def _is_stats_file(calibration: Any) -> bool:
    return isinstance(calibration, (str, Path)) and (
        str(calibration).endswith(".safetensors") or (Path(calibration) / STATS_FILE).is_file())


def _factorise(linears: dict[str, nn.Linear], config: LowRankConfig, stats: EncoderStats,
               allocated: dict[str, int | None] | None = None) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Ranks (`allocated` by a budget, else by the recipe's rule) and low-rank factors, one linear at a time
    (a file-backed layer is read, used and dropped)."""
    ranks: dict[str, int] = {}
    new_state: dict[str, torch.Tensor] = {}
    on_disk = isinstance(stats.layers, FileLayers)
    for name, linear in linears.items():
        s = stats.layers[name]
        k = allocated[name] if allocated is not None else _rank_for(name, linear, config, stats, s)
        if k is not None:
            ranks[name] = k
            first, second, bias = pca_factors(linear.weight.detach(), linear.bias, s.mean(), None, k,
                                              stats.basis(name, s))
            like = linear.weight
            new_state[f"{name}.down.weight"] = first.to(dtype=like.dtype, device=like.device)
            new_state[f"{name}.up.weight"] = second.to(dtype=like.dtype, device=like.device)
            new_state[f"{name}.up.bias"] = bias.to(dtype=like.dtype, device=like.device)
        if on_disk:  # in-memory statistics keep their bases for the next recipe
            stats.forget(name)
    return ranks, new_state


def _check_fixed_rank(linears: dict[str, nn.Linear], config: LowRankConfig) -> None:
    """Refuse, before calibrating, a fixed rank at which every target would stay dense (nothing to convert)."""
    if config.rank is None or not config.dense_if_no_saving:
        return
    shapes = [(m.in_features, m.out_features) for m in linears.values()]
    if any(fixed_rank(config.rank, i, o) is not None for i, o in shapes):
        return
    best = max(largest_saving_rank(i, o) for i, o in shapes)
    raise SlimWhisperError(f"rank {config.rank} saves nothing on any target linear (a rank-k pair costs k·(in+out) "
                           f"multiplies against in·out), so all would stay dense; choose a rank of at most {best}")


def convert_lowrank(
    model: nn.Module,
    config: LowRankConfig,
    calibration: CalibrationSource | EncoderStats | str | Path = None,
    *,
    calibration_limit: int | None = 100,
    batch_size: int = 4,
    progress: bool = True,
    stats_out: str | Path | None = None,
    work_dir: str | Path | None = None,
    stats_budget_bytes: int = STATS_BUDGET_BYTES,
) -> SlimWhisperForConditionalGeneration:
    """Return a copy of `model` whose encoder linears are low-rank as `config` says.

    Args:
        model: a (Slim)WhisperForConditionalGeneration (may already have MLA modules); left unchanged.
        config: the recipe.
        calibration: audio (path, list of paths/arrays, None = bundled clips), an `EncoderStats`, or
            the path of a saved statistics file (or a directory holding `encoder_stats.safetensors`).
        stats_out: also save the statistics here (a file path).
        work_dir: keep per-layer statistics here while measuring, so a killed run resumes (same
            settings only); default: a temporary folder.
        stats_budget_bytes: statistics of at most this many bytes are accumulated at once.
    """
    if "lowrank" in (getattr(model.config, "compression", None) or {}):
        raise SlimWhisperError("this model already has a low-rank encoder; compress the original model instead")
    linears = find_linears(model, config.targets)
    _check_fixed_rank(linears, config)
    # fixed ranks need the PCA basis too, so statistics are always measured
    with _stats_for(model, config, calibration, work_dir, calibration_limit, batch_size, stats_budget_bytes,
                    progress) as stats:
        if stats_out is not None:
            stats.save(stats_out)
        allocated = _allocate(model, linears, config, stats, calibration, calibration_limit, progress)
        ranks, new_state = _factorise(linears, config, stats, allocated)
        shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
        spec = {"recipe": config.to_dict(), "layers": ranks, "calibration_windows": stats.windows,
                "linear_flops_kept": round(flops_kept(ranks, shapes), 6)}
        audio = _audio_path(calibration)
        if audio is not None:  # `finetune` reads it to check that a recovery brings the model closer on real audio
            spec["calibration"] = audio
        slim = rebuild(model, {"lowrank": spec}, new_state, replaced=tuple(ranks))
        if config.attention_budget is not None:
            slim = _narrow(slim, config, stats, shapes, calibration, calibration_limit, progress)
    return slim


def _narrow(model: nn.Module, config: LowRankConfig, stats: EncoderStats, shapes: dict[str, tuple[int, int]],
            calibration: Any, limit: int | None, progress: bool) -> SlimWhisperForConditionalGeneration:
    """`model` (low-rank) with the heads that `config.attention_budget` narrows (`heads.py`), rebuilt from its
    config; the spec gains "head_dims" and "attention_flops_kept" and its linear FLOPs are counted anew."""
    audio = _probe_audio(calibration)
    features, weights = probe_windows(model, audio_items(audio, limit), PROBE_WINDOWS, config.audio_weight)
    dims = choose_head_dims(model, stats, config.attention_budget, features, weights, config.granule, progress)
    spec = dict(model.config.compression["lowrank"])
    ranks, new_state = narrowed_state(model, stats, dims, spec["layers"])
    layers = model.get_encoder().layers
    head_dim = layers[0].self_attn.head_dim
    spec.update(layers=ranks, head_dims=dims,
                attention_flops_kept=round(sum(dims.get(f"{ENCODER_LAYERS}.{i}.self_attn", head_dim)
                                               for i in range(len(layers))) / (head_dim * len(layers)), 6))
    slim = rebuild(model, {"lowrank": spec}, new_state, replaced=tuple(dims))
    kept = sum(linear_cost(slim.get_submodule(n)) for n in shapes) / sum(i * o for i, o in shapes.values())
    slim.config.compression["lowrank"]["linear_flops_kept"] = round(kept, 6)
    return slim


def build_geometry(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap in uninitialised low-rank modules with the saved head dims and ranks (registered as the "lowrank"
    builder)."""
    for name, dim in spec.get("head_dims", {}).items():
        if not isinstance(dim, int) or dim <= 0:
            raise SlimWhisperError(f"{name}: head dim must be a positive integer, got {dim!r}")
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        narrowed = WhisperLowRankAttention.like(getattr(parent, attr), {})
        narrowed.narrow(dim)
        setattr(parent, attr, narrowed)
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
    layers = model.get_encoder().layers
    for i, layer in enumerate(layers):
        if isinstance(layer.fc1, LowRankLinear) or isinstance(layer.fc2, LowRankLinear):
            layers[i] = WhisperLowRankEncoderLayer.adopt(layer)


register_geometry("lowrank", build_geometry)
