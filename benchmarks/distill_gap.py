"""How far each student is from its teacher on audio it was not trained on: per-token KL and top-1 agreement.

WER on a few hundred words moves by whole words, so two recovery recipes a few tenths of a point apart
cannot be told apart on it. The distillation loss itself, read on held-out clips, is a finer measure of
the same thing: here the teacher transcribes each clip greedily, and every model reads that transcript
teacher-forced; the figures are the mean KL(teacher || student) per transcript token (plus end of text)
and the share of those positions where the student's most likely token is the teacher's. Compared with
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


@torch.inference_mode()
def gap(model: torch.nn.Module, teacher: torch.nn.Module, items: Sequence[TrainItem], cache: EncoderCache,
        pad_id: int) -> dict[str, float]:
    """Mean KL per token and top-1 agreement of `model` against `teacher` on `items` (teacher-forced)."""
    kl = agree = positions = 0
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        inputs, labels = collate(chunk, pad_id)
        hidden = BaseModelOutput(last_hidden_state=load_encoder_outputs(cache, chunk).float())
        t = teacher(encoder_outputs=hidden, decoder_input_ids=inputs).logits
        s = model(encoder_outputs=hidden, decoder_input_ids=inputs).logits
        part = token_gap(s, t, labels)
        kl, agree, positions = kl + part[0], agree + part[1], positions + part[2]
    return {"kl_per_token": kl / positions, "top1_agreement": agree / positions, "tokens": positions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the original model")
    p.add_argument("--data", required=True, help="held-out clips of at most 30 s")
    p.add_argument("--language", help="only this language's clips")
    p.add_argument("--models", nargs="+", required=True, metavar="LABEL=DIR", help="students sharing the teacher's "
                   "encoder (decoder compression or recovery)")
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
    rows = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        model, _ = sw.load(path or label)
        if weights_fingerprint(model.get_encoder()) != cache.fingerprint:
            raise SystemExit(f"{label}: its encoder differs from the teacher's; this measure is for decoder students")
        figures = gap(model.eval(), teacher, items, cache, pad_id)
        rows.append([label, f"{figures['kl_per_token']:.4f}", f"{100 * figures['top1_agreement']:.2f}"])
        print(rows[-1], flush=True)
    result = {
        "title": f"{args.teacher}: distance of each student from the teacher on held-out clips",
        "header": ["model", "KL per token", "top-1 agreement %"],
        "rows": rows,
        **run_metadata(teacher=args.teacher, data=args.data, language=args.language, models=args.models,
                       clips=len(items), tokens=sum(sum(1 for x in it.labels if x != IGNORE_INDEX) for it in items)),
        "inputs": f"{len(items)} clips of {args.data}, read on the teacher's own greedy transcripts (teacher-forced).",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
