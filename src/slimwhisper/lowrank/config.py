"""`LowRankConfig`: the recipe for LiteASR-style activation-PCA low-rank compression of the encoder.

A frozen, validated, versioned dataclass like `MLAConfig`. It says how ranks are chosen; the ranks
that result (one per compressed linear) are computed at conversion time and stored in the model
config (`compression["lowrank"]["layers"]`), so a saved model rebuilds its exact shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigVersionError, SlimWhisperError
from ..recipe import Recipe

LOWRANK_FORMAT_VERSION = 1

# The six linears of every encoder layer, named relative to the layer.
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
ATTENTION_TARGETS = TARGETS[:4]
ENERGIES = ("linear", "squared")
ALLOCATIONS = ("roles", "uniform", "greedy")
# The linears that share one rank under the "roles" allocation: the projections that make the attention
# scores, those that carry the values, and the MLP.
ROLES = {"scores": ("self_attn.q_proj", "self_attn.k_proj"), "values": ("self_attn.v_proj", "self_attn.out_proj"),
         "mlp": ("fc1", "fc2")}
# Calibration windows on which the "roles" allocation measures each combination of ranks.
ROLE_PROBE_WINDOWS = 8
# Calibration windows on which the "greedy" allocation probes each linear's sensitivity alone.
PROBE_WINDOWS = 4

# The audio frames' share of each padded calibration window's weight (`LowRankConfig.audio_weight`).
AUDIO_WEIGHT = 0.8
# The share of head dims `compress-encoder --budget` keeps when --attention-budget is not given: the linears
# cannot touch the attention over 1500 frames, which caps what a budget buys (docs/lowrank.md, "Narrow heads").
BUDGET_HEADS = 0.9

# Presets per energy mode: (theta_attn, theta_mlp). "a" = quality, "b" = balanced, "c" = efficiency.
# Squared energy: the LiteASR paper/code values (0.999 everywhere; the code default 0.99:0.999; a lower
# MLP threshold). Linear (unsquared singular value) energy keeps more components at the same theta, so
# its presets were chosen to give the same encoder size as the squared ones on tiny.en (see README).
DEFAULT_PRESET = "a"
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "squared": {"a": (0.999, 0.999), "b": (0.99, 0.999), "c": (0.99, 0.995)},
    "linear": {"a": (0.93, 0.95), "b": (0.9, 0.93), "c": (0.85, 0.9)},
}


@dataclass(frozen=True)
class LowRankConfig(Recipe):
    """How to factorise encoder linears into two smaller ones by PCA of their outputs.

    Per linear y = W x + b, the rank k is the smallest multiple of `granule` whose share of the
    output-activation energy exceeds the threshold (attention or MLP); the layer stays dense when
    k (d_in + d_out) >= d_in d_out, i.e. when the two linears would not save compute.

    Args:
        theta_attn: energy threshold for q/k/v/out_proj (1.0 = all components, exact).
        theta_mlp: energy threshold for fc1/fc2.
        preset: "a" (quality; the default: the only preset usable on tiny/base without recovery
            training), "b" (balanced) or "c" (efficiency); sets both thetas for `energy`.
        rank: a fixed rank for every target instead of thresholds (rounded to nothing; dense rule applies).
        budget: keep this share (0-1) of the target linears' FLOPs instead of thresholds, shared out
            across layers and linears as `allocation` says.
        allocation: how a budget is shared: "roles" (the default: one rank for the score projections q/k,
            one for the value path v/out, one for the MLP, in every layer; the combination that fits and
            leaves the least encoder-output error, measured with all of them truncated together on
            calibration audio), "uniform" (one rank for every linear, the largest that fits) or "greedy"
            (ranks where the encoder output's error, measured one linear at a time, grows least per FLOP
            saved).
        energy: "squared" (default: sum of squared singular values = explained variance, the LiteASR
            paper; better than "linear" at preset "a" on tiny.en and base and at "b" on base) or
            "linear" (sum of singular values; better only at "b" on tiny.en, where squared collapsed).
        granule: ranks are multiples of this (16; 8 suits tiny models).
        targets: which linears of every encoder layer to consider (names relative to the layer).
        audio_weight: in every calibration window padded to 30 s, the share of the statistics' weight that the
            frames holding audio carry (the padding after them carries the rest), so PCA follows the speech
            rather than the silence that fills most of a short clip's window; None weighs every frame alike
            (LiteASR). 0.8 by default: docs/lowrank.md says how it was chosen.
        attention_budget: after the linears are factorised, narrow the heads of encoder self-attention (fewer
            dimensions per head for scores and values) until the layers keep this share (0-1) of their summed
            head dims, in the layers where the encoder output's error grows least per dimension given up
            (`heads.py`); None (the default here) keeps every head whole; `compress-encoder --budget` passes
            `BUDGET_HEADS` unless told otherwise. Needs q/k/v among the targets.
        dense_if_no_saving: keep a layer dense when the factorisation is not smaller (always on in
            practice; off only to test exactness of full-rank factorisations).
        version: format version of this recipe.
    """

    theta_attn: float | None = None
    theta_mlp: float | None = None
    preset: str | None = None
    rank: int | None = None
    budget: float | None = None
    allocation: str = "roles"
    energy: str = "squared"
    granule: int = 16
    targets: tuple[str, ...] = TARGETS
    audio_weight: float | None = AUDIO_WEIGHT
    attention_budget: float | None = None
    dense_if_no_saving: bool = True
    version: int = field(default=LOWRANK_FORMAT_VERSION)
    recipe_name = "low-rank recipe"

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.version > LOWRANK_FORMAT_VERSION:
            raise ConfigVersionError(
                f"low-rank recipe version {self.version} is newer than this slimwhisper understands "
                f"({LOWRANK_FORMAT_VERSION}); upgrade slimwhisper"
            )
        if not self.targets:
            raise SlimWhisperError("LowRankConfig.targets is empty; choose from " + ", ".join(TARGETS))
        for t in self.targets:
            if t not in TARGETS:
                raise SlimWhisperError(f"unknown low-rank target {t!r}; choose from {', '.join(TARGETS)}")
        if self.allocation not in ALLOCATIONS:
            raise SlimWhisperError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.energy not in ENERGIES:
            raise SlimWhisperError(f"unknown energy {self.energy!r}; choose from {', '.join(ENERGIES)}")
        if self.granule not in (8, 16):
            raise SlimWhisperError(f"granule must be 16 (or 8 for tiny models), got {self.granule}")
        thetas = self.theta_attn is not None or self.theta_mlp is not None
        options = (("theta", thetas), ("preset", self.preset is not None), ("rank", self.rank is not None),
                   ("budget", self.budget is not None))
        given = [n for n, ok in options if ok]
        if len(given) > 1:
            raise SlimWhisperError(f"give only one of theta, preset, rank, budget (got {', '.join(given)})")
        if not given:
            object.__setattr__(self, "preset", DEFAULT_PRESET)
        if self.preset is not None:
            if self.preset not in PRESETS[self.energy]:
                raise SlimWhisperError(f"unknown preset {self.preset!r}; choose a, b or c")
            attn, mlp = PRESETS[self.energy][self.preset]
            object.__setattr__(self, "theta_attn", attn)
            object.__setattr__(self, "theta_mlp", mlp)
        elif thetas:
            attn = self.theta_attn if self.theta_attn is not None else self.theta_mlp
            mlp = self.theta_mlp if self.theta_mlp is not None else self.theta_attn
            object.__setattr__(self, "theta_attn", float(attn))
            object.__setattr__(self, "theta_mlp", float(mlp))
        for name in ("theta_attn", "theta_mlp"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise SlimWhisperError(f"{name} must be in (0, 1], e.g. 0.99, got {value}")
        if self.audio_weight is not None and not 0.0 < self.audio_weight <= 1.0:
            raise SlimWhisperError(f"audio_weight is the audio frames' share of a window's weight, in (0, 1], e.g. "
                                   f"0.8; got {self.audio_weight}")
        if self.rank is not None and self.rank <= 0:
            raise SlimWhisperError(f"rank must be positive, got {self.rank}")
        if self.budget is not None:
            object.__setattr__(self, "budget", float(self.budget))
            if not 0.0 < self.budget < 1.0:
                raise SlimWhisperError(f"budget is the share of the encoder's linear FLOPs to keep, in (0, 1), "
                                       f"e.g. 0.6; got {self.budget}")

        if self.attention_budget is not None:
            self._check_attention_budget()

    def _check_attention_budget(self) -> None:
        """The budget is a share in (0, 1), and narrowing reads the statistics of q, k and v."""
        object.__setattr__(self, "attention_budget", float(self.attention_budget))
        if not 0.0 < self.attention_budget < 1.0:
            raise SlimWhisperError(f"attention budget is the share of the heads' dimensions to keep, in (0, 1), "
                                   f"e.g. 0.7; got {self.attention_budget}")
        missing = [t for t in ATTENTION_TARGETS[:3] if t not in self.targets]
        if missing:
            raise SlimWhisperError(f"an attention budget needs the statistics of {', '.join(missing)}: keep them "
                                   f"among the targets")

    def theta_for(self, target: str) -> float | None:
        """The threshold for a target name (None in fixed-rank and budget modes)."""
        if self.rank is not None or self.budget is not None:
            return None
        return self.theta_attn if target.startswith("self_attn.") else self.theta_mlp

    @classmethod
    def _prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        # recorded before these fields existed: every frame weighed 1, one rank for every linear
        data = {"audio_weight": None, "allocation": "uniform", **data}
        if data.get("preset") is not None:  # thetas are derived from the preset
            data = {k: v for k, v in data.items() if k not in ("theta_attn", "theta_mlp")}
        return data


def parse_theta(text: str) -> tuple[float, float]:
    """`"0.99:0.999"` -> (attention, MLP); a single value applies to both."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise SlimWhisperError(f"--theta must look like 0.99 or 0.99:0.999, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise SlimWhisperError(f"--theta must look like 0.99 or 0.99:0.999, got {text!r}")
