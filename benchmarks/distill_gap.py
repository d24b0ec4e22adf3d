"""How far each student is from its teacher on audio it was not trained on: per-token KL and top-1 agreement.

WER on a few hundred words moves by whole words, so two recovery recipes a few tenths of a point apart
cannot be told apart on it. The distillation loss itself, read on held-out clips, is a finer measure of
the same thing: here the teacher transcribes each clip greedily, and every model reads that transcript
teacher-forced; the figures are the mean KL(teacher || student) per transcript token (plus end of text)
and the share of those positions where the student's most likely token is the teacher's. A student whose
encoder differs (a low-rank encoder) reads its own encoder's outputs, and the table adds the encoder term of
the recovery loss on these clips (the squared error of its encoder output over the teacher's energy), and
the same over the frames that hold each clip's audio and over the padding after them. Compared with
the loss a run logged on its own training clips (`loss.csv`, column kd) it separates what a recipe
learned in general from what it learned of its training utterances.

    python benchmarks/distill_gap.py --teacher tiny.en --data ../shared/data/realspeech/manifest.jsonl \
        --language en --models converted=M recovered=FT/model --out benchmarks/results/distill-gap
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

import slimwhisper as sw
from slimwhisper.bench.common import run_metadata, write_result
from slimwhisper.data import load_sample_audio
from slimwhisper.lowrank.calibrate import audio_frames
from slimwhisper.recovery.data import (
    EncoderCache,
    TrainItem,
    build_items,
    collate,
    fill_encoder_cache,
    hash_samples,
    load_encoder_outputs,
    open_train_data,
    teacher_transcripts,
    weights_fingerprint,
)
from slimwhisper.recovery.losses import IGNORE_INDEX

BATCH = 8


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


@torch.inference_mode()
def gap(model: torch.nn.Module, teacher: torch.nn.Module, items: Sequence[TrainItem], cache: EncoderCache,
        own: EncoderCache, audio: Sequence[int], pad_id: int) -> dict[str, float]:
    """Mean KL per token and top-1 agreement of `model` against `teacher` on `items` (teacher-forced), and the
    encoder gaps; `own` holds the student's encoder outputs (the teacher's cache when the encoders are equal),
    `audio[i]` is the number of encoder frames holding item i's audio."""
    kl = agree = positions = 0
    enc: list[torch.Tensor] = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        inputs, labels = collate(chunk, pad_id)
        t_hidden = load_encoder_outputs(cache, chunk).float()
        s_hidden = t_hidden if own is cache else load_encoder_outputs(own, chunk).float()
        enc.append(encoder_gap(s_hidden, t_hidden, audio[start : start + BATCH]))
        t = teacher(encoder_outputs=BaseModelOutput(last_hidden_state=t_hidden), decoder_input_ids=inputs).logits
        s = model(encoder_outputs=BaseModelOutput(last_hidden_state=s_hidden), decoder_input_ids=inputs).logits
        part = token_gap(s, t, labels)
        kl, agree, positions = kl + part[0], agree + part[1], positions + part[2]
    return {"kl_per_token": kl / positions, "top1_agreement": agree / positions, "tokens": positions,
            **dict(zip(("encoder_error", "encoder_error_audio", "encoder_error_padding"),
                       torch.cat(enc).mean(0).tolist(), strict=True))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the original model")
    p.add_argument("--data", required=True, help="held-out clips of at most 30 s")
    p.add_argument("--language", help="only this language's clips")
    p.add_argument("--models", nargs="+", required=True, metavar="LABEL=DIR", help="students of the teacher "
                   "(decoder or encoder compression, recovered or not)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    teacher, processor = sw.load(args.teacher)
    teacher.eval()
    samples, report, _ = open_train_data(args.data)
    samples = [s for s in samples if args.language is None or s.language == args.language]
    pairs = hash_samples(samples, report)
    texts = teacher_transcripts(teacher, processor, pairs, None, args.language, progress=False)
    items = build_items(pairs, teacher, processor.tokenizer, texts, args.language, 440)
    cache = EncoderCache(None, weights_fingerprint(teacher.get_encoder()))
    fill_encoder_cache(teacher, processor.feature_extractor, items, cache, progress=False)
    pad_id = teacher.generation_config.pad_token_id
    frames = teacher.config.max_source_positions
    audio = [audio_frames(load_sample_audio(it.sample).shape[0], frames) for it in items]
    rows = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        model, _ = sw.load(path or label)
        own = EncoderCache(None, weights_fingerprint(model.get_encoder()))
        if own.fingerprint == cache.fingerprint:
            own = cache
        else:
            fill_encoder_cache(model.eval(), processor.feature_extractor, items, own, progress=False)
        figures = gap(model.eval(), teacher, items, cache, own, audio, pad_id)
        rows.append([label, f"{figures['kl_per_token']:.4f}", f"{100 * figures['top1_agreement']:.2f}",
                     *(f"{figures[k]:.4f}" for k in ("encoder_error", "encoder_error_audio", "encoder_error_padding"))])
        print(rows[-1], flush=True)
    result = {
        "title": f"{args.teacher}: distance of each student from the teacher on held-out clips",
        "header": ["model", "KL per token", "top-1 agreement %", "encoder error", "on audio frames", "on padding"],
        "rows": rows,
        **run_metadata(teacher=args.teacher, data=args.data, language=args.language, models=args.models,
                       clips=len(items), tokens=sum(sum(1 for x in it.labels if x != IGNORE_INDEX) for it in items)),
        "inputs": f"{len(items)} clips of {args.data}, read on the teacher's own greedy transcripts (teacher-forced).",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
