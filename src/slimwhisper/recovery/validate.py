"""How close a student is to its original on real audio: the check that decides whether a recovery is kept.

Label-free training can lower its own loss while moving the model away from the speech it will transcribe:
a low-rank encoder distilled on synthetic voices fits those voices and drifts on real recordings
(docs/recovery.md). WER on a few hundred words moves by whole words, so the measure here is finer: the
original transcribes each validation clip greedily, and both models read that transcript teacher-forced; the
figures are the mean KL(original || student) per transcript token (plus end of text) and the share of
positions where both rank the same token first, with each student reading its own encoder's output. No
references are needed, so any real audio serves. `finetune` reads each arm before and after training and
keeps the trained weights only when they are at least as close (`pipeline.py`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..data import load_sample_audio
from ..errors import SlimWhisperError
from ..lowrank.calibrate import audio_frames
from .data import TrainItem, build_items, collate, hash_samples, log_mel, open_train_data, teacher_transcripts
from .losses import IGNORE_INDEX

BATCH = 8
# clips read at most, spread evenly over the source: enough for a KL per token that moves by far less than a
# recovery's effect, and each check stays a minute or two on a CPU
MAX_CLIPS = 200


@dataclass(frozen=True)
class ValidationSet:
    """Clips with the original's transcripts, tokenised, and the encoder frames that hold each clip's audio."""

    source: str
    items: list[TrainItem]
    audio: list[int]

    @property
    def tokens(self) -> int:
        return sum(sum(1 for x in it.labels if x != IGNORE_INDEX) for it in self.items)


def validation_set(teacher: nn.Module, processor: Any, source: str | os.PathLike, language: str | None = None,
                   max_tokens: int = 440, cache_dir: str | os.PathLike | None = None, progress: bool = False,
                   max_clips: int = MAX_CLIPS) -> ValidationSet:
    """The clips of `source` (at most 30 s each; longer ones are skipped; at most `max_clips`, spread evenly) read
    by the original `teacher`."""
    samples, report, _ = open_train_data(str(source))
    if language is not None:
        samples = [s for s in samples if s.language in (None, language)]
    if len(samples) > max_clips:
        samples = [samples[i * len(samples) // max_clips] for i in range(max_clips)]
    pairs = hash_samples(samples, report)
    if not pairs:
        raise SlimWhisperError(f"validation data {source} holds no readable clip of at most 30 s; give a manifest "
                               "of real recordings (transcripts are not needed)")
    texts = teacher_transcripts(teacher, processor, pairs, cache_dir, language, progress=progress)
    items = build_items(pairs, teacher, processor.tokenizer, texts, language, max_tokens)
    frames = teacher.config.max_source_positions
    audio = [audio_frames(load_sample_audio(it.sample).shape[0], frames) for it in items]
    return ValidationSet(str(source), items, audio)


def token_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[float, int, int]:
    """(sum of KL(teacher || student), top-1 agreements, positions) over the labelled positions of one batch."""
    mask = labels != IGNORE_INDEX
    s = torch.log_softmax(student_logits[mask].double(), dim=-1)
    t = torch.log_softmax(teacher_logits[mask].double(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    agree = (s.argmax(-1) == t.argmax(-1)).sum()
    return float(kl.sum()), int(agree), int(mask.sum())


def encoder_gap(student: torch.Tensor, teacher: torch.Tensor, audio: Sequence[int]) -> torch.Tensor:
    """Per clip [B, 3]: ||student − teacher||² / ||teacher||² over the whole encoder output (the recovery's
    encoder term), over the frames that hold the clip's audio, and over the padding after them."""
    diff, energy = (student - teacher).pow(2).sum(-1), teacher.pow(2).sum(-1)  # [B, frames]
    rows = []
    for b, n in enumerate(audio):
        parts = (slice(None), slice(0, n), slice(n, None))
        rows.append([float(diff[b, p].sum() / energy[b, p].sum()) if energy[b, p].numel() else 0.0 for p in parts])
    return torch.tensor(rows, dtype=torch.float64)


def _encode(model: nn.Module, feature_extractor: Any, audios: list) -> torch.Tensor:
    param = next(model.parameters())
    return model.get_encoder()(log_mel(feature_extractor, audios, param.device, param.dtype)).last_hidden_state


def distance(model: nn.Module, teacher: nn.Module, validation: ValidationSet, feature_extractor: Any,
             pad_id: int) -> dict[str, float]:
    """`distances` of one model."""
    return distances([model], teacher, validation, feature_extractor, pad_id)[0]


@torch.inference_mode()
def distances(models: Sequence[nn.Module], teacher: nn.Module, validation: ValidationSet, feature_extractor: Any,
              pad_id: int) -> list[dict[str, float]]:
    """Per model: the mean KL per token and top-1 agreement against `teacher` on the validation clips, and the mean
    encoder gaps (`encoder_gap`). Every model runs in eval mode on its own encoder's output; each batch's audio is
    decoded and the teacher run once for all of them."""
    was = [m.training for m in models], teacher.training
    for m in (*models, teacher):
        m.eval()
    sums = [[0.0, 0, 0] for _ in models]  # KL, agreements, positions
    gaps: list[list[torch.Tensor]] = [[] for _ in models]
    try:
        for start in range(0, len(validation.items), BATCH):
            chunk = validation.items[start : start + BATCH]
            audios = [load_sample_audio(it.sample) for it in chunk]
            inputs, labels = collate(chunk, pad_id)
            t_hidden = _encode(teacher, feature_extractor, audios)
            t = teacher(encoder_outputs=BaseModelOutput(last_hidden_state=t_hidden),
                        decoder_input_ids=inputs.to(t_hidden.device)).logits.cpu()
            for i, model in enumerate(models):
                s_hidden = _encode(model, feature_extractor, audios)
                gaps[i].append(encoder_gap(s_hidden.float().cpu(), t_hidden.float().cpu(),
                                           validation.audio[start : start + BATCH]))
                s = model(encoder_outputs=BaseModelOutput(last_hidden_state=s_hidden),
                          decoder_input_ids=inputs.to(s_hidden.device)).logits
                sums[i] = [a + b for a, b in zip(sums[i], token_gap(s.cpu(), t, labels), strict=True)]
    finally:
        for m, mode in zip(models, was[0], strict=True):
            m.train(mode)
        teacher.train(was[1])
    return [_figures(total, torch.cat(gap).mean(0).tolist()) for total, gap in zip(sums, gaps, strict=True)]


def _figures(total: Sequence, gaps: Sequence[float]) -> dict[str, float]:
    kl, agree, positions = total
    return {"kl_per_token": kl / max(positions, 1), "top1_agreement": agree / max(positions, 1), "tokens": positions,
            **dict(zip(("encoder_error", "encoder_error_audio", "encoder_error_padding"), gaps, strict=True))}
