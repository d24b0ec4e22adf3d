"""Output statistics of encoder linears on calibration audio, streamed, and their save/reuse file.

One pass of the unmodified encoder (LiteASR semantics: every layer is calibrated on the original
model, not re-calibrated after earlier layers are compressed). Forward hooks on q/k/v/out_proj,
fc1 (its output, i.e. before GELU) and fc2 add every output row y (all 1500 frames of every 30-s
window, padding included) to float64 running sums: sum y [d_out] and sum y y^T [d_out, d_out].
Memory is fixed by the layer sizes, not by the amount of audio.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimWhisperError

STATS_FILE = "encoder_stats.safetensors"
STATS_FORMAT = "slimwhisper-lowrank-stats-1"


@dataclass
class LinearStats:
    """Running float64 sums of one linear's outputs."""

    total: torch.Tensor  # [d_out] sum of y
    gram: torch.Tensor  # [d_out, d_out] sum of y y^T
    rows: int = 0

    @classmethod
    def zeros(cls, d_out: int) -> LinearStats:
        return cls(torch.zeros(d_out, dtype=torch.float64), torch.zeros(d_out, d_out, dtype=torch.float64))

    def add(self, y: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1]).double()
        self.total += y.sum(0)
        self.gram += y.T @ y
        self.rows += y.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.gram / max(self.rows, 1) - torch.outer(mu, mu)


@dataclass
class EncoderStats:
    """Statistics of every target linear (by fully-qualified name), with what they were measured on."""

    layers: dict[str, LinearStats]
    windows: int = 0
    fingerprint: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    _bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def basis(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA eigenvalues/eigenvectors of one layer's outputs, computed once and reused by every recipe."""
        if name not in self._bases:
            from .math import pca_basis

            self._bases[name] = pca_basis(self.layers[name].covariance())
        return self._bases[name]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, s in self.layers.items():
            tensors[f"{name}.total"] = s.total.contiguous()
            tensors[f"{name}.gram"] = s.gram.contiguous()
            tensors[f"{name}.rows"] = torch.tensor([s.rows], dtype=torch.int64)
        meta = {"format": STATS_FORMAT, "windows": str(self.windows), "fingerprint": self.fingerprint, **self.extra}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EncoderStats:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        if not path.is_file():
            raise SlimWhisperError(f"no calibration statistics at {path}; run compress-encoder without --stats first")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATS_FORMAT:
            raise SlimWhisperError(
                f"{path} is not a slimwhisper encoder statistics file (format {meta.get('format')!r})"
            )
        raw = load_file(str(path))
        layers: dict[str, LinearStats] = {}
        for key in raw:
            if key.endswith(".total"):
                name = key[: -len(".total")]
                layers[name] = LinearStats(raw[key], raw[f"{name}.gram"], int(raw[f"{name}.rows"][0]))
        extra = {k: v for k, v in meta.items() if k not in ("format", "windows", "fingerprint")}
        return cls(layers, int(meta.get("windows", 0)), meta.get("fingerprint", ""), extra)


def encoder_fingerprint(model: nn.Module) -> str:
    """A short hash of the encoder weights: statistics only fit the encoder they were measured on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.get_encoder().state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_linear_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    targets: dict[str, nn.Module],
    total_batches: int | None = None,
    progress: bool = True,
) -> EncoderStats:
    """Run the encoder over log-mel batches [B, n_mels, 3000] and sum each target's outputs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stats = {name: LinearStats.zeros(module.out_features) for name, module in targets.items()}

    def hook_for(name: str):
        def hook(_module, _args, output):
            stats[name].add(output.detach().cpu() if output.device.type != "cpu" else output.detach())

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets.items()]
    was_training = model.training
    model.eval()
    windows = 0
    try:
        for features in tqdm(batches, desc="calibrating encoder", unit="batch", total=total_batches,
                             disable=not progress):
            model.get_encoder()(features.to(device=device, dtype=dtype))
            windows += features.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return EncoderStats(stats, windows, encoder_fingerprint(model))


def batches_needed(windows: int, batch_size: int) -> int:
    return math.ceil(windows / batch_size)
