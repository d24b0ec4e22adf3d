"""`slimwhisper eval MODEL --data PATH [--baseline MODEL] [--language xx] [--limit N] --out DIR`.

The main CLI registers this with `add_parser(subparsers)` and calls `run(args)`; user mistakes raise
`SlimWhisperError`, which the main CLI prints as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..cliargs import (
    add_batch_size,
    add_device,
    add_engine_options,
    add_model,
    add_out,
    add_quiet,
    output_folder,
    positive_int,
    resolve_device,
    resolve_model,
)
from ..data import open_dataset
from ..data.records import normalize_language
from ..decoding import ENGINES, check_engine_options
from ..errors import SlimWhisperError
from .evaluate import LONG_AUDIO_CHOICES, check_settings, evaluate
from .report import SUMMARY_JSON, SUMMARY_MD, markdown_table
from .shards import current_shard, shard_device

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `eval` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help="word/character error rate of a model, optionally against a baseline",
        description="Transcribe a dataset, score it with Whisper's normalisers (corpus WER/CER per language) and, "
        "with --baseline, report the difference with a paired-bootstrap 95%% interval. Every utterance is logged "
        "to DIR/utterances.jsonl as it is scored; rerunning the same command resumes. Under torchrun or "
        "`accelerate launch --multi_gpu`, each process decodes a share and the first merges them.",
    )
    add_model(p)
    p.add_argument("--data", required=True, help="manifest.jsonl, LibriSpeech tree, Common Voice folder or .tsv, "
                   "datasets.save_to_disk folder, or a folder/CSV of audio")
    add_out(p, "output folder: summary.json, summary.md, utterances.jsonl")
    p.add_argument("--baseline", help="model to compare against on the same utterances")
    p.add_argument("--language", help="evaluate only this language (samples without one count as it) and "
                   "decode it as that language")
    p.add_argument("--limit", type=int, help="first N samples only (after --language)")
    p.add_argument("--split", help="split of a Common Voice folder or a saved DatasetDict (default: test)")
    add_batch_size(p, 8, "utterances decoded together")
    p.add_argument("--beams", type=positive_int, default=1, help="beam size; 1 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per 30-s window")
    p.add_argument("--engine", choices=ENGINES, default="fast",
                   help="fast: the engine, as `slimwhisper transcribe` runs it (default); generate: transformers' "
                   "generate(), the reference")
    p.add_argument("--long-audio", choices=LONG_AUDIO_CHOICES, default="longform",
                   help="clips over 30 s: decode long-form with timestamps (default), skip and report, or stop")
    add_device(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    add_engine_options(p)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable, empty or missing file "
                   "instead of skipping and reporting it")
    p.add_argument("--bootstrap", type=int, default=10_000, help="paired-bootstrap draws (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    add_quiet(p)
    return p


def _load(name: str, device: str, dtype: Any) -> tuple[Any, Any]:
    try:
        from ..loading import load
    except ImportError as exc:
        raise SlimWhisperError(f"cannot load '{name}': slimwhisper.loading is not available ({exc})") from exc
    return load(name, device=device, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    """Evaluate, write DIR/summary.json and summary.md, print the table."""
    import torch

    language = normalize_language(args.language)
    if args.limit is not None and args.limit < 1:
        raise SlimWhisperError("--limit must be at least 1")
    check_settings(args.batch_size, args.beams, args.engine, args.long_audio, args.max_new_tokens, args.bootstrap)
    check_engine_options(args.engine, args.quantize, args.kv_cache)
    data = open_dataset(args.data, split=args.split, keep_language=language, limit=args.limit,
                        on_error="raise" if args.strict else "skip")
    output_folder(args.out)  # after --data is read, so bad data leaves no empty folder (the CLI checked --out)
    device = resolve_device(args.device)
    shard = current_shard(device)  # one of several processes under torchrun / accelerate launch --multi_gpu
    device = shard_device(device, shard)
    dtype = getattr(torch, args.dtype)
    model, processor = _load(args.model, device, dtype)
    baseline = _load(args.baseline, device, dtype) if args.baseline else None
    result = evaluate(
        model, processor, data, batch_size=args.batch_size, num_beams=args.beams, language=language,
        out_dir=Path(args.out), baseline=baseline, tag=args.model, baseline_tag=args.baseline, device=device,
        dtype=dtype, max_new_tokens=args.max_new_tokens, long_audio=args.long_audio, engine=args.engine,
        quantize=args.quantize, kv_cache=args.kv_cache,
        on_error="raise" if args.strict else "skip", n_bootstrap=args.bootstrap, seed=args.seed,
        progress=not args.quiet, shard=shard,
    )
    if not shard.main:  # the main process prints the one table
        return 0
    print(markdown_table(result))
    split = f"{shard.world} processes; " if shard.world > 1 else ""
    print(f"\n{result.skipped.describe()}; {result.wall_seconds:.1f} s; {split}"
          f"wrote {Path(args.out) / SUMMARY_JSON} and {Path(args.out) / SUMMARY_MD}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m slimwhisper.eval.cli eval ...`), same behaviour as the main CLI."""
    parser = argparse.ArgumentParser(prog="slimwhisper")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        resolve_model(args)
        return run(args)
    except SlimWhisperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
