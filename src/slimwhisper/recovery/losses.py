"""Training losses and learning-rate schedules as small pure functions.

Logits are [B, L, V]; labels are [B, L] with -100 where nothing is predicted (prefix and padding).
Distillation uses the same positions as cross-entropy, so both terms average over the same tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions that are not trained (HF / PyTorch convention)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy over labelled positions, their "mean" or "sum" (0 when there are none)."""
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction=reduction)


def distillation(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, times T^2, averaged over labelled tokens.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.), so `kd_weight` means the
    same at any temperature. Computed in fp32: the log-softmax over a 51k vocabulary loses too much in half.
    """
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return student.sum() * 0.0
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)  # (N,)
    return kl.mean() * temperature**2


def topk_distillation(
    student: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor, labels: torch.Tensor,
    temperature: float = 1.0, reduction: str = "mean",
) -> torch.Tensor:
    """KL between the teacher's and the student's distributions coarsened to the teacher's top-k tokens + "rest".

    `top_idx` / `top_logp` [B, L, k] are the teacher's k most likely tokens and their temperature-softened
    log-probabilities (precomputed once, so the teacher never runs during training). The k+1-bucket KL is
    0 exactly when the student matches the teacher on those buckets and positive otherwise; with k = 64
    the rest bucket holds well under 1% of Whisper's probability mass. Times T^2, the "mean" or "sum" over
    labelled tokens.
    """
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return student.sum() * 0.0
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)  # (N, V)
    s_k = s.gather(-1, top_idx[mask].long())  # (N, k)
    t_k = top_logp[mask].float()
    p_k = t_k.exp()
    head = (p_k * (t_k - s_k)).sum(-1)
    t_rest = (1 - p_k.sum(-1)).clamp_min(1e-8)
    s_rest = (1 - s_k.exp().sum(-1)).clamp_min(1e-8)
    rest = t_rest * (t_rest.log() - s_rest.log())
    per_token = head + rest
    return (per_token.sum() if reduction == "sum" else per_token.mean()) * temperature**2


def combined_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    ce_weight: float,
    kd_weight: float,
    temperature: float,
    tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_weight·CE + kd_weight·KD, CE, KD); KD is 0 without the teacher's (top_idx, top_logp).

    Both terms are means over this batch's labelled tokens, or, with `tokens`, sums divided by `tokens`:
    the labelled tokens of the whole optimizer step, so that micro-batches and processes holding
    different token counts add up to exactly the mean over the step's batch.
    """
    reduction = "mean" if tokens is None else "sum"
    ce = cross_entropy(student, labels, reduction)
    if teacher_topk is None:
        kd = ce.detach() * 0.0
    else:
        kd = topk_distillation(student, teacher_topk[0], teacher_topk[1], labels, temperature, reduction)
    if tokens is not None:
        ce, kd = ce / tokens, kd / tokens
    return ce_weight * ce + kd_weight * kd, ce, kd


def encoder_distillation(student: torch.Tensor, teacher: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over utterances of the squared error of encoder states over the teacher's energy.

    States are [B, T, d] (the output) or [B, L, T, d] (every layer's output; each layer's error is over
    its own energy, then averaged over layers, so deep layers whose states are larger weigh no more).
    `weights` [B, T] weighs each frame in both sums (None: alike); Whisper pads every clip to 30 s, so
    without them a short clip's padding, not its speech, is most of what is fitted.
    Relative per utterance, so quiet and loud clips weigh alike and the value reads the same for any
    model width (0.01 = the student's states are off by a tenth of their norm). Summed, so a caller
    divides by the step's utterances and micro-batches add up to the step's mean.
    """
    t = teacher.float()
    error = (student.float() - t).pow(2).sum(-1)  # [B, (L,) T]
    energy = t.pow(2).sum(-1)
    if weights is not None:
        w = weights.to(error.device, error.dtype)
        w = w if error.dim() == 2 else w.unsqueeze(1)
        error, energy = error * w, energy * w
    relative = error.sum(-1) / energy.sum(-1).clamp_min(1e-12)
    return relative.reshape(relative.shape[0], -1).mean(dim=1).sum()


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.1,
              decay_fraction: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`.

    "cosine": linear warmup, then cosine from 1 to `min_ratio`. "wsd": linear warmup, constant, then
    1 - sqrt decay to `min_ratio` over the last `decay_fraction` of the steps (warmup-stable-decay).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup - 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "wsd":
        decay_steps = max(1, round(total * decay_fraction))
        start = total - decay_steps
        if step < start:
            return 1.0
        progress = (step - start + 1) / decay_steps
        return min_ratio + (1 - min_ratio) * (1 - math.sqrt(min(progress, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")
