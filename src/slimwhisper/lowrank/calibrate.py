"""Output statistics of encoder linears on calibration audio: streamed, bounded in memory, resumable.

LiteASR semantics: every layer is calibrated on the unmodified encoder (not re-calibrated after earlier
layers are compressed). Forward hooks on q/k/v/out_proj, fc1 (its output, i.e. before GELU) and fc2 add
every output row y (all 1500 frames of every 30-s window) to float64 running sums, each row weighted:
sum w [weight], sum w y [d_out] and sum w y y^T [d_out, d_out]. Whisper pads every window to 30 s, so in
short clips most rows are padding; `frame_weights` gives the frames that hold audio a fixed share of
each window's weight (`LowRankConfig.audio_weight`), so the principal directions follow the speech
rather than the silence after it.

Memory is bounded twice over. Audio is decoded one recording at a time and rows are added in chunks, so
nothing grows with the amount of audio. Layers are calibrated in groups whose statistics fit a byte
budget (`layer_groups`), one pass over the audio per group that stops after the group's last layer, so
nothing grows with the number of layers either. Finished layers go to a work folder (one file per layer,
written atomically); a run killed at any point resumes from the layers already on disk
(`CalibrationWork`), and a layer's sums do not depend on the group it was measured in, so a resumed run
gives the same statistics as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimWhisperError

STATS_FILE = "encoder_stats.safetensors"
STATS_FORMAT = "slimwhisper-lowrank-stats-1"
WORK_FORMAT = "slimwhisper-lowrank-work-1"
MANIFEST = "manifest.json"
# Statistics of this many bytes may live at once (the default group size): a few layers of large-v3.
STATS_BUDGET_BYTES = 2 * 2**30
# Rows converted to float64 at a time: bounds the temporary copy whatever the batch size.
ROW_CHUNK = 4096
# One encoder frame per 320 samples (a 160-sample mel hop, then a stride-2 convolution).
SAMPLES_PER_FRAME = 320
# Frames right after a window's audio count as audio: the convolutions and attention spread speech there.
AUDIO_MARGIN_FRAMES = 25


@dataclass
class LinearStats:
    """Running float64 sums of one linear's outputs; `rows` is the sum of the row weights."""

    total: torch.Tensor  # [d_out] sum of w y
    gram: torch.Tensor  # [d_out, d_out] sum of w y y^T
    rows: float = 0.0

    @classmethod
    def zeros(cls, d_out: int) -> LinearStats:
        return cls(torch.zeros(d_out, dtype=torch.float64), torch.zeros(d_out, d_out, dtype=torch.float64))

    def add(self, y: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the rows of y [..., d_out], each with its weight (`weights` shaped like y without its last dim)."""
        y = y.reshape(-1, y.shape[-1])
        w = None if weights is None else weights.reshape(-1).to(torch.float64)
        for start in range(0, y.shape[0], ROW_CHUNK):
            chunk = y[start:start + ROW_CHUNK].to(torch.float64, copy=True)  # scaled in place below
            if w is None:
                self.total += chunk.sum(0)
            else:  # Σ w y, then Σ (√w y)(√w y)ᵀ = Σ w y yᵀ without a second copy of the chunk
                part = w[start:start + ROW_CHUNK]
                self.total += part @ chunk
                chunk.mul_(part.sqrt()[:, None])
            self.gram.addmm_(chunk.T, chunk)
        self.rows += float(y.shape[0] if w is None else w.sum())

    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1e-30)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.gram / max(self.rows, 1e-30) - torch.outer(mu, mu)


def audio_frames(samples: int, frames: int = 1500) -> int:
    """Encoder frames of a window that hold its audio (plus `AUDIO_MARGIN_FRAMES`), at most `frames`."""
    return min(frames, math.ceil(samples / SAMPLES_PER_FRAME) + AUDIO_MARGIN_FRAMES)


def frame_weights(audio: Sequence[int], audio_weight: float | None, frames: int = 1500) -> torch.Tensor | None:
    """Row weights [B, frames] for windows whose first `audio[b]` frames hold audio: those weigh 1 each, and the
    padding after them shares (1 − audio_weight)/audio_weight of their total, so in every padded window the
    audio carries `audio_weight` of the weight. A window's weight thus grows with its audio, not its padding.
    None: every frame weighs 1 (the padding of a short clip then outweighs its speech)."""
    if audio_weight is None:
        return None
    weights = torch.zeros(len(audio), frames, dtype=torch.float64)
    for b, n in enumerate(audio):
        weights[b, :n] = 1.0
        if n < frames:
            weights[b, n:] = n * (1.0 - audio_weight) / audio_weight / (frames - n)
    return weights


def stats_bytes(d_out: int) -> int:
    """Bytes of one linear's running sums (float64 gram and total)."""
    return 8 * d_out * (d_out + 1)


class FileLayers(Mapping):
    """Linear name -> `LinearStats`, read from safetensors files only when asked (never all at once)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, name: str) -> LinearStats:
        with safe_open(str(self.files[name]), "pt") as f:
            rows = float(f.get_tensor(f"{name}.rows")[0])  # int64 in files written before weights
            return LinearStats(f.get_tensor(f"{name}.total"), f.get_tensor(f"{name}.gram"), rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def width(self, name: str) -> int:
        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_slice(f"{name}.total").get_shape()[0]

    @classmethod
    def of(cls, path: Path) -> FileLayers:
        with safe_open(str(path), "pt") as f:
            return cls({k[: -len(".total")]: path for k in f.keys() if k.endswith(".total")})


@dataclass
class EncoderStats:
    """Statistics of every target linear (by fully-qualified name), with what they were measured on.

    `layers` is a dict, or a `FileLayers` that reads one linear at a time from disk (large models).
    """

    layers: Mapping[str, LinearStats]
    windows: int = 0
    fingerprint: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    _bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def basis(self, name: str, stats: LinearStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA eigenvalues/eigenvectors of one layer's outputs, computed once and reused by every recipe."""
        if name not in self._bases:
            from .math import pca_basis

            self._bases[name] = pca_basis((stats or self.layers[name]).covariance())
        return self._bases[name]

    def forget(self, name: str) -> None:
        """Drop a cached basis: a converter done with a layer frees its [d_out, d_out] eigenvectors."""
        self._bases.pop(name, None)

    def width(self, name: str) -> int:
        layers = self.layers
        return layers.width(name) if isinstance(layers, FileLayers) else layers[name].total.numel()

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file, one linear at a time, through a temporary file and a rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": STATS_FORMAT, "windows": str(self.windows), "fingerprint": self.fingerprint, **self.extra}
        names = list(self.layers)
        entries, offset = {}, 0
        for name in names:
            d = self.width(name)
            for suffix, dtype, shape, size in ((".total", "F64", [d], 8 * d), (".gram", "F64", [d, d], 8 * d * d),
                                               (".rows", "F64", [1], 8)):
                entries[name + suffix] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
        header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for name in names:
                s = self.layers[name]
                for tensor in (s.total, s.gram, torch.tensor([s.rows], dtype=torch.float64)):
                    f.write(memoryview(tensor.contiguous().numpy()).cast("B"))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EncoderStats:
        """Open a saved statistics file; each linear's sums are read when a converter asks for them."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        if not path.is_file():
            raise SlimWhisperError(f"no calibration statistics at {path}; run compress-encoder without --stats first")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise SlimWhisperError(f"{path} is not a readable statistics file ({exc}); calibrate again") from exc
        if meta.get("format") != STATS_FORMAT:
            raise SlimWhisperError(
                f"{path} is not a slimwhisper encoder statistics file (format {meta.get('format')!r})"
            )
        extra = {k: v for k, v in meta.items() if k not in ("format", "windows", "fingerprint")}
        return cls(FileLayers.of(path), int(meta.get("windows", 0)), meta.get("fingerprint", ""), extra)

    def in_memory(self) -> EncoderStats:
        """The same statistics with every linear read into memory (small models, or for tests)."""
        return EncoderStats({n: self.layers[n] for n in self.layers}, self.windows, self.fingerprint, dict(self.extra))


def encoder_fingerprint(model: nn.Module) -> str:
    """A short hash of the encoder weights: statistics only fit the encoder they were measured on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.get_encoder().state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def layer_index(name: str) -> int:
    """Encoder layer of a fully-qualified linear name ("model.encoder.layers.7.fc1" -> 7)."""
    return int(name.split(".")[3])


def layer_groups(targets: Mapping[str, nn.Linear], budget_bytes: int = STATS_BUDGET_BYTES) -> list[list[int]]:
    """Consecutive encoder layers packed so each group's statistics fit `budget_bytes` (at least one layer)."""
    per_layer: dict[int, int] = {}
    for name, module in targets.items():
        per_layer[layer_index(name)] = per_layer.get(layer_index(name), 0) + stats_bytes(module.out_features)
    groups: list[list[int]] = []
    used = 0
    for layer in sorted(per_layer):
        if not groups or used + per_layer[layer] > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += per_layer[layer]
    return groups


class _GroupDone(Exception):
    """Raised after the last layer of a group: the layers above it need not run for this pass."""


@torch.no_grad()
def collect_linear_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    targets: Mapping[str, nn.Module],
    total_batches: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    fingerprint: str | None = None,
) -> EncoderStats:
    """Run the encoder over log-mel batches [B, n_mels, 3000] and sum each target's outputs; a batch given as
    (features, weights) weights its rows as `weights` [B, frames] says (`frame_weights`), else each by 1.

    `stop_after`: the encoder layer after which each forward pass stops (the group's last layer);
    `fingerprint`: the encoder's, when the caller has it already (hashing a big encoder takes a while).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stats = {name: LinearStats.zeros(module.out_features) for name, module in targets.items()}
    current: dict[str, torch.Tensor | None] = {"weights": None}

    def hook_for(name: str):
        def hook(_module, _args, output):
            rows = output.detach().cpu() if output.device.type != "cpu" else output.detach()
            stats[name].add(rows, current["weights"])

        return hook

    def stop(_module, _args, _output):
        raise _GroupDone

    encoder = model.get_encoder()
    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets.items()]
    if stop_after is not None:
        handles.append(encoder.layers[stop_after].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    windows = 0
    try:
        for batch in tqdm(batches, desc="calibrating encoder", unit="batch", total=total_batches,
                          disable=not progress):
            features, current["weights"] = batch if isinstance(batch, tuple) else (batch, None)
            try:
                encoder(features.to(device=device, dtype=dtype))
            except _GroupDone:
                pass
            windows += features.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return EncoderStats(stats, windows, fingerprint if fingerprint is not None else encoder_fingerprint(model))


def batches_needed(windows: int, batch_size: int) -> int:
    return math.ceil(windows / batch_size)


def audio_items(source: Any, limit: int | None) -> list:
    """The recordings of a calibration source (paths or arrays), not yet decoded: streamed one at a time."""
    from ..calibration import calibration_items

    items = calibration_items(source, limit)
    if not items:
        raise SlimWhisperError(f"no calibration audio found in {source}; give a folder of audio files or a manifest")
    return items


def stream_windows(items: list) -> Iterator[np.ndarray]:
    """16 kHz windows of each recording in turn: one recording is decoded at a time."""
    from ..audio import load_audio, split_windows

    for item in items:
        yield from split_windows(item if isinstance(item, np.ndarray) else load_audio(item))


def audio_key(items: list) -> str:
    """A hash naming the calibration audio (paths with their sizes, or the samples), for the work manifest."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            digest.update(np.ascontiguousarray(item).tobytes())
        else:
            path = Path(item)
            digest.update(f"{path.resolve()}:{path.stat().st_size if path.exists() else -1}".encode())
    return digest.hexdigest()[:16]


class CalibrationWork:
    """A folder of finished layers' statistics, one file per encoder layer, so a killed run resumes.

    Every file is written to a temporary name and renamed, so a file present is a finished layer; the
    manifest names the settings (encoder, audio, batch size, targets) and a folder made with other
    settings is refused rather than mixed in.
    """

    def __init__(self, folder: str | Path, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.settings = settings

    def open(self) -> CalibrationWork:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # left by a killed run: never a finished file
            stale.unlink(missing_ok=True)
        manifest = self.folder / MANIFEST
        wanted = {"format": WORK_FORMAT, "settings": self.settings}
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text())
            except ValueError:
                found = None
            if found != wanted:
                raise SlimWhisperError(f"{self.folder} holds calibration made with other settings; delete that "
                                       "folder or choose another --out")
        else:
            _write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(wanted, indent=2) + "\n"))
        return self

    def path(self, layer: int) -> Path:
        return self.folder / f"layer-{layer:03d}.safetensors"

    def done(self, layers: Iterable[int]) -> set[int]:
        return {i for i in layers if self.path(i).is_file()}

    def write(self, layer: int, stats: EncoderStats) -> None:
        """Save one layer's sums (all its target linears) and the number of windows they cover."""
        tensors: dict[str, torch.Tensor] = {}
        for name, s in stats.layers.items():
            if layer_index(name) == layer:
                tensors.update({f"{name}.total": s.total, f"{name}.gram": s.gram,
                                f"{name}.rows": torch.tensor([s.rows], dtype=torch.float64)})
        meta = {"format": STATS_FORMAT, "windows": str(stats.windows), "fingerprint": stats.fingerprint}
        _write_atomic(self.path(layer), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def windows(self, layers: Iterable[int]) -> int:
        """Windows every finished layer was measured on (the same audio, so one number)."""
        counts = set()
        for i in layers:
            with safe_open(str(self.path(i)), "pt") as f:
                counts.add(int((f.metadata() or {}).get("windows", -1)))
        if len(counts) != 1:
            raise SlimWhisperError(f"{self.folder} holds layers measured on different audio; delete it and rerun")
        return counts.pop()


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary sibling and one rename: a killed writer leaves no half file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def measure_stats(
    model: nn.Module,
    items: list,
    targets: Mapping[str, nn.Linear],
    work: CalibrationWork,
    *,
    batch_size: int = 4,
    budget_bytes: int = STATS_BUDGET_BYTES,
    progress: bool = True,
    audio_weight: float | None = None,
) -> EncoderStats:
    """Statistics of `targets` over the recordings `items`, group by group into `work`; resumes finished layers.
    `audio_weight`: the share of each padded window's weight its audio frames carry (`frame_weights`).

    Returns an `EncoderStats` that reads each linear from the work folder when asked.
    """
    if budget_bytes <= 0:
        raise SlimWhisperError(f"the statistics budget must be positive, e.g. --stats-budget-gib 2 ({budget_bytes} B)")
    work.open()
    layers = sorted({layer_index(n) for n in targets})
    todo = {n: m for n, m in targets.items() if layer_index(n) not in work.done(layers)}
    fingerprint = work.settings["fingerprint"]
    for group in layer_groups(todo, budget_bytes):
        chosen = {n: m for n, m in todo.items() if layer_index(n) in group}
        batches = weighted_batches(items, model.config.num_mel_bins, batch_size, audio_weight)
        stats = collect_linear_stats(model, batches, chosen, progress=progress, stop_after=group[-1],
                                     fingerprint=fingerprint)
        if stats.windows == 0:
            raise SlimWhisperError("the calibration audio holds no samples; give recordings with sound")
        for layer in group:
            work.write(layer, stats)
        del stats
    files = {n: work.path(layer_index(n)) for n in targets}
    return EncoderStats(FileLayers(files), work.windows(layers), fingerprint)


def weighted_batches(items: list, num_mel_bins: int, batch_size: int,
                     audio_weight: float | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(log-mel features, row weights) of each batch of consecutive windows of the recordings `items`."""
    from ..calibration import feature_batches

    lengths: list[int] = []

    def windows() -> Iterator[np.ndarray]:
        for window in stream_windows(items):
            lengths.append(audio_frames(len(window)))
            yield window

    for features in feature_batches(windows(), num_mel_bins, batch_size):
        audio, lengths[:] = lengths[: features.shape[0]], lengths[features.shape[0]:]
        yield features, frame_weights(audio, audio_weight, features.shape[-1] // 2)


def work_folder_for(out: str | Path) -> Path:
    """Where compress-encoder keeps finished layers for `--out OUT`: a hidden sibling, so OUT stays empty until
    the model is complete and a re-run of the same command (same OUT) finds them."""
    out = Path(out)
    return out.parent / f".{out.name}.calibration"


def probe_windows(model: nn.Module, items: list, windows: int,
                  audio_weight: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-mel features [n, n_mels, 3000] of the first 30-s window of `windows` recordings spread evenly over
    `items` (a manifest sorted by language or speaker still gives a mixed probe), and the frames' weights
    [n, frames] under `audio_weight` (None: every frame alike)."""
    param = next(model.parameters())
    chosen = [items[round(i * len(items) / windows)] for i in range(min(windows, len(items)))]
    firsts = [next(stream_windows([item])) for item in chosen]  # arrays: each is its own single window
    features, weights = next(weighted_batches(firsts, model.config.num_mel_bins, len(firsts), audio_weight))
    return features.to(param.device, param.dtype), weights


def _layer_inputs(encoder: nn.Module, features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The hidden states entering every encoder layer, and the encoder's output, from one pass."""
    inputs: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for layer in encoder.layers]
    try:
        output = encoder(features).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return inputs, output


def _tail(encoder: nn.Module, hidden: torch.Tensor, first: int) -> torch.Tensor:
    """The encoder's output from the input of layer `first` on (the layers before it are unchanged)."""
    for layer in encoder.layers[first:]:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


@torch.no_grad()
def probe_errors(model: nn.Module, linears: Mapping[str, nn.Linear], stats: EncoderStats, features: torch.Tensor,
                 granule: int, progress: bool = True,
                 weights: torch.Tensor | None = None) -> dict[str, dict[int, float]]:
    """Per linear and probed rank k (`math.probe_ranks`): the encoder output's relative squared error when that
    linear alone keeps k principal components of its outputs (what a rank-k factorisation computes), each
    frame weighted by `weights` [n, frames] (`probe_windows`; None: every frame alike).

    The encoder runs once to record every layer's input, then each probe runs on from the linear's layer.
    Whisper's residual stream carries a few huge activation channels, so a linear's share of its own
    output energy says little about what its loss does downstream; this measures that directly.
    """
    from .math import probe_ranks

    encoder = model.get_encoder()
    inputs, reference = _layer_inputs(encoder, features)
    on_disk = isinstance(stats.layers, FileLayers)
    errors: dict[str, dict[int, float]] = {}
    for name, linear in tqdm(linears.items(), desc="probing ranks", unit="linear", disable=not progress):
        errors[name] = {}
        ranks = probe_ranks(linear.in_features, linear.out_features, granule)
        if not ranks:  # no rank saves FLOPs: the allocation keeps it dense
            continue
        vectors = stats.basis(name)[1].to(features.dtype)
        mean = stats.layers[name].mean().to(features.dtype)
        for k in ranks:
            basis = vectors[:, :k]

            def project(_module, _args, y, basis=basis, mean=mean):
                return mean + ((y - mean) @ basis) @ basis.T

            handle = linear.register_forward_hook(project)
            try:
                output = _tail(encoder, inputs[layer_index(name)], layer_index(name))
            finally:
                handle.remove()
            errors[name][k] = weighted_error(output, reference, weights)
        if on_disk:
            stats.forget(name)
    return errors


def weighted_error(output: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Relative squared error of encoder outputs [B, T, d], each frame weighted ([B, T]; None: alike)."""
    diff = (output.double() - reference.double()).pow(2).sum(-1)
    energy = reference.double().pow(2).sum(-1)
    if weights is None:
        return float(diff.sum() / energy.sum())
    weights = weights.to(diff.device)
    return float((weights * diff).sum() / (weights * energy).sum())


class RoleProbe:
    """The encoder output's error when several linears together keep only their first principal components
    (what their rank-k factor pairs compute), measured on a few calibration windows.

    Unlike `probe_errors` (one linear at a time), every linear is truncated at once: errors of truncated
    linears do not add, so a combination of ranks has to be measured as a whole. Each linear's basis is
    kept only up to the largest rank it may get, in the model's dtype.
    """

    def __init__(self, model: nn.Module, linears: Mapping[str, nn.Linear], stats: EncoderStats,
                 largest: Mapping[str, int], features: torch.Tensor, weights: torch.Tensor | None):
        self.encoder, self.linears, self.features, self.weights = model.get_encoder(), linears, features, weights
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in linears:
            if largest.get(name):  # 0: no rank saves anything there, it stays dense
                vectors = stats.basis(name)[1][:, : largest[name]]
                self.bases[name] = (stats.layers[name].mean().to(features.dtype), vectors.to(features.dtype))
            if isinstance(stats.layers, FileLayers):
                stats.forget(name)
        with torch.no_grad():
            self.reference = self.encoder(features).last_hidden_state

    @torch.no_grad()
    def error(self, ranks: Mapping[str, int | None]) -> float:
        """Weighted relative error of the encoder output with every linear in `ranks` (None: dense) truncated."""
        handles = []
        for name, k in ranks.items():
            if k is None:
                continue
            mean, vectors = self.bases[name]
            basis = vectors[:, :k]

            def project(_module, _args, y, basis=basis, mean=mean):
                return mean + ((y - mean) @ basis) @ basis.T

            handles.append(self.linears[name].register_forward_hook(project))
        try:
            output = self.encoder(self.features).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        return weighted_error(output, self.reference, self.weights)
