"""`MLAConfig`: the recipe for converting Whisper attention to multi-head latent attention.

A frozen, validated, versioned dataclass (peft/torchao style). It says *what* to convert and *how*;
the per-layer geometry that results (kept-dim indices, latent widths) is computed at conversion
time and stored in the model config (`slimwhisper.models.SlimWhisperConfig`), so a saved model
rebuilds its exact shapes without re-running the conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigVersionError, SlimWhisperError
from ..recipe import Recipe

# 2 added `allocation`; a version-1 recipe has none and reads as "uniform", which is what it did.
MLA_FORMAT_VERSION = 2

# Which attention modules can be converted, and where they live in a HF Whisper model.
MODULE_KINDS = ("decoder_self", "decoder_cross", "encoder_self")
SELECTIONS = ("uniform", "high", "low", "2norm")
FACTORIZATIONS = ("activation", "joint", "split")
ALLOCATIONS = ("uniform", "greedy")


def default_allocation(kv_reduction: float | None, factorization: str) -> str:
    """What `slimwhisper convert` does when --allocation is not given: a --kv-reduction is a budget spread
    greedily over the modules (docs/mla.md has the comparison that made it the command's default), unless
    no budget is given or the factorisation cannot price widths; `MLAConfig` itself keeps the paper's uniform
    widths unless asked."""
    return "greedy" if kv_reduction is not None and factorization != "split" else "uniform"


@dataclass(frozen=True)
class MLAConfig(Recipe):
    """How to turn multi-head attention into multi-head latent attention.

    Per converted module, each head keeps `kept_dims` key dimensions exact (cached as they are) and
    the remaining key dimensions plus all value dimensions are rebuilt from one shared latent of
    width `d_c`, which is all that is cached besides the kept dims.

    Exactly one of `latent_rank` (per head: d_c = latent_rank * heads), `latent_dim` (total d_c) or
    `kv_reduction` (fraction of the MHA cache saved: d_c = (1 - kv_reduction) * 2 * d_model
    - heads * kept_dims) sets the latent width; with none of them d_c = d_model, which is exact.

    Args:
        modules: attention modules to convert: any of "decoder_self" (default, the paper's best
            trade-off), "decoder_cross", "encoder_self".
        kept_dims: key dims per head kept exact (the paper's r). 0 (pure latent) is the default:
            Whisper has no RoPE, and at a fixed cache budget kept dims did not help.
        latent_rank: latent width per head (d_c = latent_rank * heads).
        latent_dim: total latent width d_c.
        kv_reduction: target saving of the converted modules' KV cache, e.g. 0.75.
        selection: how kept dims are chosen: "uniform" (evenly spaced), "high"/"low" (MHA2MLA's
            frequency bands, kept for reproducing the paper) or "2norm" (largest E|q_i|*E|k_i| on
            calibration audio).
        factorization: "activation" (default: joint SVD weighted by the layer inputs' second moment
            on calibration audio), "joint" (SVD of [W_k rows not kept; W_v], weights only, as the
            paper) or "split" (separate SVDs of the key and value parts, half the latent each).
        allocation: how `kv_reduction` is spread: "uniform" (the paper: every module the same d_c) or
            "greedy" (the reduction is a budget on the total cache bytes of one utterance, 448 decoder
            tokens and 1500 encoder frames, over all converted modules; each module's width is grown
            where it removes the most reconstruction error per cached byte, the error weighted by the
            module's output sensitivity measured on calibration audio; `allocate.py`, docs/mla.md).
        damping: for "activation": ridge added to the input second moment, as a fraction of its mean
            eigenvalue, so directions the calibration audio rarely excites keep some weight. The decoder
            sees only a few hundred tokens in the bundled clips (fewer rows than d_model), and too little
            damping then breaks base while 0.1 keeps it (BENCHMARKS.md). Lower it when calibrating on
            thousands of utterances.
        version: format version of this recipe.
    """

    modules: tuple[str, ...] = ("decoder_self",)
    kept_dims: int = 0
    latent_rank: int | None = None
    latent_dim: int | None = None
    kv_reduction: float | None = None
    selection: str = "uniform"
    factorization: str = "activation"
    damping: float = 0.1
    allocation: str = "uniform"
    version: int = field(default=MLA_FORMAT_VERSION)
    recipe_name = "MLA recipe"

    def __post_init__(self) -> None:
        modules = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        object.__setattr__(self, "modules", tuple(dict.fromkeys(modules)))
        if not self.modules:
            raise SlimWhisperError("MLAConfig.modules is empty; choose from " + ", ".join(MODULE_KINDS))
        for m in self.modules:
            if m not in MODULE_KINDS:
                raise SlimWhisperError(f"unknown MLA module {m!r}; choose from {', '.join(MODULE_KINDS)}")
        if self.version > MLA_FORMAT_VERSION:
            raise ConfigVersionError(
                f"MLA recipe version {self.version} is newer than this slimwhisper understands "
                f"({MLA_FORMAT_VERSION}); upgrade slimwhisper"
            )
        if self.kept_dims < 0:
            raise SlimWhisperError(f"kept_dims must be >= 0, got {self.kept_dims}")
        given = [n for n in ("latent_rank", "latent_dim", "kv_reduction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise SlimWhisperError(f"give only one of latent_rank, latent_dim, kv_reduction (got {', '.join(given)})")
        if self.latent_rank is not None and self.latent_rank <= 0:
            raise SlimWhisperError(f"latent_rank must be positive, got {self.latent_rank}")
        if self.latent_dim is not None and self.latent_dim <= 0:
            raise SlimWhisperError(f"latent_dim must be positive, got {self.latent_dim}")
        if self.kv_reduction is not None and not 0.0 < self.kv_reduction < 1.0:
            raise SlimWhisperError(f"kv_reduction must be between 0 and 1 (e.g. 0.75), got {self.kv_reduction}")
        if self.selection not in SELECTIONS:
            raise SlimWhisperError(f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.selection in ("high", "low") and self.kept_dims % 2:
            raise SlimWhisperError(f"selection {self.selection!r} keeps pairs of dims: kept_dims must be even")
        if self.damping < 0:
            raise SlimWhisperError(f"damping must be >= 0, got {self.damping}")
        if self.factorization not in FACTORIZATIONS:
            raise SlimWhisperError(
                f"unknown factorization {self.factorization!r}; choose from {', '.join(FACTORIZATIONS)}"
            )
        if self.allocation not in ALLOCATIONS:
            raise SlimWhisperError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.allocation == "greedy" and self.kv_reduction is None:
            raise SlimWhisperError("allocation 'greedy' spreads a cache budget: give kv_reduction (e.g. 0.875)")
        if self.allocation == "greedy" and self.factorization == "split":
            # split truncates two spectra at fixed halves, so one joint spectrum would misprice its widths
            raise SlimWhisperError("allocation 'greedy' prices widths on the joint spectrum; use factorization "
                                   "'activation' or 'joint'")

    @property
    def needs_calibration(self) -> bool:
        """Whether conversion needs statistics measured on calibration audio."""
        return (self.factorization == "activation" or (self.kept_dims > 0 and self.selection == "2norm")
                or self.allocation == "greedy")

    def latent_width(self, d_model: int, num_heads: int) -> int:
        """The latent width d_c for a module of this size; validated against the geometry."""
        head_dim = d_model // num_heads
        if self.kept_dims > head_dim:
            raise SlimWhisperError(f"kept_dims={self.kept_dims} exceeds the head dim {head_dim}")
        kept_total = self.kept_dims * num_heads
        if self.latent_rank is not None:
            d_c = self.latent_rank * num_heads
        elif self.latent_dim is not None:
            d_c = self.latent_dim
        elif self.kv_reduction is not None:
            budget = (1.0 - self.kv_reduction) * 2 * d_model  # cached numbers per token
            d_c = int(round(budget)) - kept_total
            if d_c <= 0:
                raise SlimWhisperError(
                    f"kv_reduction={self.kv_reduction} leaves {budget:.0f} cached numbers per token, which "
                    f"the {kept_total} kept key dims already use up; lower kept_dims or the reduction"
                )
        else:
            d_c = d_model
        if d_c > d_model:
            raise SlimWhisperError(
                f"latent width {d_c} exceeds d_model={d_model}: [W_k; W_v] has rank <= d_model, so a "
                f"wider latent cannot help; use at most latent_dim={d_model} (kv_reduction >= "
                f"{1 - (d_model + kept_total) / (2 * d_model):.4f} for kept_dims={self.kept_dims})"
            )
        return d_c
