"""`FinetuneConfig`: the recovery fine-tuning recipe (frozen, validated, JSON round trip).

The defaults are the documented recipe: `slimwhisper finetune MODEL --train DATA --out DIR` with no
other option trains the modules the compression replaced (MLA attention, low-rank linears; the encoder
is otherwise frozen and its outputs cached, the embeddings frozen) to match the original by
distillation from its logits, read on the original's own greedy transcripts (label-free), for 300
steps of 8 utterances at lr 1e-4 (minutes on a CPU for tiny/base). Chosen by experiment, read on
held-out clips as the per-token KL to the original as well as WER (docs/recovery.md has the tables):
training the whole decoder memorises a few hundred training utterances, and its tied token embedding
most of all; the replaced modules alone carry over to new speech better at the same steps and time.
Label-free targets beat cross-entropy on (lowercase, unpunctuated) references, which taught the model
to drop case and punctuation, and distillation alone beat distillation plus cross-entropy on the
greedy transcripts on every data and test set tried, so `ce_weight` is 0. A low-rank encoder adds
encoder distillation and takes fewer steps (`LOWRANK_ENCODER_RECIPE`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlimWhisperError
from ..lowrank.config import AUDIO_WEIGHT
from ..recipe import Recipe

FINETUNE_FORMAT_VERSION = 1
SCOPES = ("converted", "decoder", "all")
SCHEDULES = ("cosine", "wsd")
MIXED_PRECISION = ("no", "bf16", "fp16")
ENCODER_LAYERS = ("final", "all")


# What the bare command changes when the model's encoder is low-rank: the encoder's output is distilled
# too, for fewer steps, since the trained encoder makes each step several times dearer (see
# docs/recovery.md). Like the plain recipe it trains the converted modules and distils alone.
LOWRANK_ENCODER_RECIPE = {"encoder_weight": 1.0, "steps": 100}

# What a field missing from a run recorded before it existed meant, where that differs from today's
# default: every run before `embeddings` existed trained them, and weighed every frame of the encoder's
# 30-s window alike in encoder distillation.
RECORDED_BEFORE = {"embeddings": True, "encoder_audio_weight": None}


@dataclass(frozen=True)
class FinetuneConfig(Recipe):
    """How to fine-tune a compressed Whisper (and its paired control, identically).

    Args:
        scope: trainable parameters: "converted" (the modules the compression replaced: MLA attention,
            low-rank encoder linears), "decoder" (the whole decoder) or "all".
        embeddings: also train the token and position embeddings in the scope (the decoder's token
            embedding is tied to its output projection). Off by default: see the module docstring.
        steps: optimizer steps.
        batch_size: utterances per optimizer step (over all processes and accumulation steps).
        micro_batch_size: at most this many utterances per forward pass (capped at batch_size, so
            `--batch-size 4` alone is one forward of 4); each process splits its share of a step into
            such micro-batches. The loss is normalised over the whole step's labelled tokens, so the
            split (processes x micro-batches) never changes the gradient.
        lr: peak learning rate of AdamW.
        betas, weight_decay, eps: AdamW.
        schedule: "cosine" (linear warmup then cosine to `min_lr_ratio`·lr) or "wsd" (warmup, stable,
            then 1-sqrt decay over the last `decay_fraction` of the steps).
        warmup_steps: linear warmup length (capped at steps - 1).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        decay_fraction: share of the steps that WSD spends decaying.
        clip_norm: gradient clipping (global L2 norm); 0 disables it.
        min_loss: a step whose whole loss is below this in magnitude skips the optimizer update (it is
            still logged and counts in the schedule). Such a loss is float rounding, not signal: a control
            trained by distillation alone starts equal to its teacher, and Adam, which scales every
            gradient to a step of about the learning rate, would turn that rounding into a random walk
            away from the original. Any real compression's loss is orders of magnitude above it; 0 never
            skips.
        ce_weight, kd_weight: weights of cross-entropy on the targets (the original's transcripts, or the
            references with label_free off) and of the distillation loss.
        encoder_weight: weight of encoder distillation: the squared error of the student encoder's
            output against the original's (cached once, label-free), over the original's energy, per
            utterance. It needs a trained encoder (a low-rank one: scope "converted" or "all").
        encoder_layers: which encoder states that distillation matches: "final" (the encoder's output) or
            "all" (every layer's output, each over its own energy, averaged over layers: every layer gets
            its own target instead of only the gradient that flows back from the last one).
        encoder_audio_weight: the share of each padded window's weight in encoder distillation that
            the frames holding audio carry (the padding shares the rest); None weighs every frame
            alike, which lets the padding of short clips dominate what is fitted.
        augment: share of each step's clips played through a random recording channel (level, band limit,
            room, noise floor; `recovery/augment.py`), drawn afresh at every step. Teacher and student hear
            the same altered clip, so the teacher runs during training (without gradients) and the student's
            encoder runs every step; 0 (the plain recipe) trains on the audio as given.
        temperature: distillation temperature (the KL term is scaled by T^2).
        kd_top_k: the teacher's k most likely tokens per position are distilled (plus one bucket for the
            rest); computed once per clip and cached, so the teacher never runs during training (with
            `augment`, on each step's altered clips instead).
        label_free: use the teacher's greedy transcripts as targets (default) instead of the references.
        language: language of samples whose source names none (multilingual models only).
        seed: data order and initialisation of everything random.
        checkpoint_every: save a resumable checkpoint every this many steps (and at the end).
        max_label_tokens: longer transcripts are cut (Whisper's decoder holds 448 positions).
        mixed_precision: "no", "bf16" or "fp16" (GPU only; CPU always trains in fp32).
    """

    scope: str = "converted"
    embeddings: bool = False
    steps: int = 300
    batch_size: int = 8
    micro_batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1
    clip_norm: float = 1.0
    min_loss: float = 1e-6
    ce_weight: float = 0.0
    kd_weight: float = 1.0
    encoder_weight: float = 0.0
    encoder_layers: str = "final"
    encoder_audio_weight: float | None = AUDIO_WEIGHT  # the calibration's share: fit the frames the factors fit
    augment: float = 0.0
    temperature: float = 1.0
    kd_top_k: int = 64
    label_free: bool = True
    language: str | None = None
    seed: int = 0
    checkpoint_every: int = 25
    max_label_tokens: int = 440
    mixed_precision: str = "no"
    version: int = FINETUNE_FORMAT_VERSION

    recipe_name = "FinetuneConfig"

    def __post_init__(self) -> None:
        if 1 <= self.batch_size < self.micro_batch_size:  # a cap above the batch means one forward per step
            object.__setattr__(self, "micro_batch_size", self.batch_size)
        checks = [
            (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.mixed_precision in MIXED_PRECISION,
             f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"),
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "batch sizes must be at least 1"),
            (self.batch_size % self.micro_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), "
             f"got {self.betas}"),
            (self.warmup_steps >= 0, f"warmup_steps must not be negative, got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}"),
            (self.clip_norm >= 0 and self.weight_decay >= 0, "clip_norm and weight_decay must not be negative"),
            (self.min_loss >= 0, f"min_loss must not be negative (0 never skips a step), got {self.min_loss}"),
            (self.ce_weight >= 0 and self.kd_weight >= 0 and self.ce_weight + self.kd_weight > 0,
             "ce_weight and kd_weight must not be negative, and not both 0 (with --kd-weight 0, give "
             "--ce-weight 1)"),
            (self.encoder_weight >= 0, f"encoder_weight must not be negative, got {self.encoder_weight}"),
            (self.encoder_layers in ENCODER_LAYERS,
             f"encoder_layers must be one of {', '.join(ENCODER_LAYERS)}, got {self.encoder_layers!r}"),
            (self.encoder_audio_weight is None or 0 < self.encoder_audio_weight <= 1,
             f"encoder_audio_weight is a share in (0, 1], or none; got {self.encoder_audio_weight}"),
            (0 <= self.augment <= 1, f"augment is a share of the clips, in [0, 1]; got {self.augment}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.kd_top_k >= 1, f"kd_top_k must be at least 1, got {self.kd_top_k}"),
            (not (self.label_free and self.kd_weight == 0 and self.ce_weight == 0), "nothing to train on"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}"),
            (self.max_label_tokens >= 1, "max_label_tokens must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlimWhisperError(message)
        if self.version > FINETUNE_FORMAT_VERSION:
            from ..errors import ConfigVersionError

            raise ConfigVersionError(f"FinetuneConfig version {self.version} is newer than this slimwhisper reads")

    @classmethod
    def defaults_for(cls, compression: dict | None) -> dict:
        """The documented recipe's values for a model compressed as `compression` says (its config's
        `compression`): the plain defaults, or `LOWRANK_ENCODER_RECIPE` over them for a low-rank encoder."""
        return dict(LOWRANK_ENCODER_RECIPE) if "lowrank" in (compression or {}) else {}

    @property
    def needs_teacher(self) -> bool:
        """Distillation (of logits or encoder states) and label-free targets need the original model."""
        return self.kd_weight > 0 or self.label_free or self.encoder_weight > 0

    @property
    def warmup(self) -> int:
        """Warmup steps actually used (at most steps - 1, so short runs still reach the peak)."""
        return min(self.warmup_steps, max(self.steps - 1, 0))
