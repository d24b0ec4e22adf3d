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
learned in general from what it learned of its training utterances. The measure is the one `finetune`
uses to decide whether a recovery is kept (`slimwhisper.recovery.validate`).

    python benchmarks/distill_gap.py --teacher tiny.en --data ../shared/data/realspeech/manifest.jsonl \
        --language en --models converted=M recovered=FT/model --out benchmarks/results/distill-gap
"""
from __future__ import annotations

import argparse

import slimwhisper as sw
from slimwhisper.bench.common import run_metadata, write_result
from slimwhisper.recovery.validate import distances, validation_set


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
    validation = validation_set(teacher, processor, args.data, args.language)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    labels = [spec.partition("=")[0] for spec in args.models]
    models = [sw.load(spec.partition("=")[2] or spec)[0] for spec in args.models]
    rows = []
    for label, figures in zip(labels, distances(models, teacher, validation, processor.feature_extractor, pad_id)):
        rows.append([label, f"{figures['kl_per_token']:.4f}", f"{100 * figures['top1_agreement']:.2f}",
                     *(f"{figures[k]:.4f}" for k in ("encoder_error", "encoder_error_audio", "encoder_error_padding"))])
        print(rows[-1], flush=True)
    result = {
        "title": f"{args.teacher}: distance of each student from the teacher on held-out clips",
        "header": ["model", "KL per token", "top-1 agreement %", "encoder error", "on audio frames", "on padding"],
        "rows": rows,
        **run_metadata(teacher=args.teacher, data=args.data, language=args.language, models=args.models,
                       clips=len(validation.items), tokens=validation.tokens),
        "inputs": f"{len(validation.items)} clips of {args.data}, read on the teacher's own greedy transcripts "
                  "(teacher-forced).",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
