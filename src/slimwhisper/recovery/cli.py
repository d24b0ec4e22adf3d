"""`slimwhisper finetune MODEL_DIR --train DATA [--control] --out DIR`: recovery fine-tuning.

Every option defaults to the documented recipe (`FinetuneConfig()`), so the bare command is the recipe.
Scales out unchanged with `accelerate launch --multi_gpu --num_processes N -m slimwhisper.cli finetune ...`
or `torchrun --nproc_per_node N -m slimwhisper.cli finetune ...` (GPUs, or CPU processes over gloo when
there is no GPU); `--batch-size` stays the global batch, so the result does not depend on N.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from ..cliargs import add_device, add_model, add_out, add_quiet, audio_share, output_folder
from ..errors import SlimWhisperError
from .config import ENCODER_LAYERS, LOWRANK_ENCODER_RECIPE, MIXED_PRECISION, SCHEDULES, SCOPES, FinetuneConfig

# FinetuneConfig fields exposed as --options (name -> type); the help text comes from the config docstring.
_OPTIONS = {
    "steps": int, "batch_size": int, "micro_batch_size": int, "lr": float, "weight_decay": float,
    "warmup_steps": int, "min_lr_ratio": float, "decay_fraction": float, "clip_norm": float,
    "min_loss": float, "ce_weight": float, "kd_weight": float, "encoder_weight": float, "augment": float,
    "temperature": float, "seed": int,
    "checkpoint_every": int,
}  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `finetune` subcommand."""
    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune", help="recovery fine-tuning of a compressed model (with a paired control)",
        description="Fine-tune a compressed model (by default the modules the compression replaced; the rest "
        "frozen) to match its original: distillation from its logits on its own transcripts (--ce-weight adds "
        "cross-entropy on them, or, with --no-label-free, on the references); with --control, train the same "
        "modules of the original identically as the baseline. --scope decoder trains the whole decoder.",
    )
    add_model(p, help="a compressed model directory (from `slimwhisper convert` / `compress-encoder`)")
    p.add_argument("--train", required=True, nargs="+", help="training data: manifest.jsonl, LibriSpeech, Common "
                   "Voice, ... (several sources are mixed into one set)")
    add_out(p, "output folder: model/, control/, finetune.json, loss.png")
    p.add_argument("--control", action="store_true", help="also train the unconverted original identically")
    lowrank = LOWRANK_ENCODER_RECIPE
    p.add_argument("--scope", choices=SCOPES, default=d.scope, help=f"trainable parameters: the modules the "
                   f"compression replaced, the whole decoder, or everything (default {d.scope})")
    p.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=d.embeddings,
                   help="also train the token and position embeddings of the scope (default: frozen)")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help=f"lr schedule (default {d.schedule})")
    for name, kind in _OPTIONS.items():
        flags = ["--" + name.replace("_", "-")] + (["--batch"] if name == "batch_size" else [])
        note = f"; {lowrank[name]} for a low-rank encoder" if name in lowrank else ""
        # An option whose default depends on the model stays None when not given; config_from_args fills it.
        p.add_argument(*flags, dest=name, type=kind, default=None if name in lowrank else getattr(d, name),
                       help=f"default {getattr(d, name)}{note}")
    p.add_argument("--encoder-layers", choices=ENCODER_LAYERS, help="what encoder distillation matches: the encoder's "
                   f"output (final) or every layer's output (all) (default {d.encoder_layers})")
    p.add_argument("--encoder-audio-weight", type=audio_share, default=d.encoder_audio_weight, metavar="W",
                   help="share of each padded window that its audio frames carry in encoder distillation "
                   f"(default {d.encoder_audio_weight}; none: every frame alike)")
    p.add_argument("--betas", type=float, nargs=2, default=list(d.betas), help="AdamW betas (default 0.9 0.95)")
    p.add_argument("--label-free", action=argparse.BooleanOptionalAction, default=d.label_free,
                   help="targets: the original's greedy transcripts (default; keeps its style, needs no transcripts) "
                   "or, with --no-label-free, the dataset's references")
    p.add_argument("--language", help="language of samples whose data names none (multilingual models)")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=MIXED_PRECISION,
                   help="bf16/fp16 on a GPU (CPU always trains in fp32)")
    p.add_argument("--teacher", help="the uncompressed original (default: the source recorded in the model)")
    p.add_argument("--validation", default="auto", metavar="DATA", help="real recordings (transcripts not needed) "
                   "on which each arm is read against the original before and after training; the trained weights "
                   "are kept only if at least as close there (KL per token). Default auto: a low-rank encoder's "
                   "recorded calibration audio, when it is still there; none: always keep the trained weights")
    p.add_argument("--cache-dir", help="encoder-output cache (default ~/.cache/slimwhisper/encoder-outputs)")
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    add_quiet(p)
    return p


def config_from_args(args: argparse.Namespace, compression: dict | None = None) -> FinetuneConfig:
    """The FinetuneConfig the options describe for a model compressed as `compression` says (validated there):
    options not given take the recipe's default for that model."""
    known = {f.name for f in fields(FinetuneConfig)}
    values = {name: getattr(args, name) for name in _OPTIONS}
    values.update(scope=args.scope, embeddings=args.embeddings, encoder_layers=args.encoder_layers,
                  schedule=args.schedule, betas=tuple(args.betas), label_free=args.label_free,
                  language=args.language, mixed_precision=args.mixed_precision)
    given = {k: v for k, v in values.items() if k in known and v is not None}  # None: not given
    given["encoder_audio_weight"] = args.encoder_audio_weight  # always given: None means every frame alike
    return FinetuneConfig(**{**FinetuneConfig.defaults_for(compression), **given})


def _device(name: str) -> str | None:
    """auto: Accelerate's choice (the GPU when there is one; each process its own under `accelerate launch`)."""
    return None if name == "auto" else name


def warn_single_process_launch(env: dict[str, str] | None = None) -> bool:
    """Say so when `accelerate launch --cpu --num_processes N` (N > 1) started this as its only process.

    With `--cpu` accelerate always takes its simple launcher: one process, which gets MASTER_ADDR (set only
    when N > 1) but no rank or world size; N CPU processes would need mpirun (`--mpirun_hostfile`). The run
    is still correct, on one process, so this warns rather than refuses.
    """
    env = os.environ if env is None else env
    ranked = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    single = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env
    if not single or any(k in env for k in ranked):
        return False
    print("slimwhisper: warning: accelerate launch --cpu starts one process whatever --num_processes says; "
          "for N processes use `accelerate launch --multi_gpu --num_processes N` (CPU processes over gloo when "
          "there is no GPU) or `torchrun --nproc_per_node N`", file=sys.stderr)
    return True


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from accelerate import PartialState

    from .pipeline import RecoveryJob, recorded, recover, validation_source

    warn_single_process_launch()
    config = config_from_args(args, recorded(args.model, "compression"))
    for source in args.train:
        if not Path(source).expanduser().exists():
            raise SlimWhisperError(f"training data {source} does not exist; give a manifest.jsonl or dataset folder")
    validation_source(args.validation, None)  # a named path that is not there is refused before --out is made
    output_folder(args.out)  # a file, or a folder that cannot be made, is refused before any work
    train = args.train[0] if len(args.train) == 1 else list(args.train)
    job = RecoveryJob(model=args.model, train=train, out=args.out, config=config, control=args.control,
                      teacher=args.teacher, cache_dir=args.cache_dir, device=_device(args.device),
                      overwrite=args.overwrite, progress=not args.quiet, validation=args.validation)
    record = recover(job)
    arms = {arm: {k: r[k] for k in ("path", "steps_done", "wall_seconds", "last", "validation")
                  if k in r} for arm, r in record["arms"].items()}
    if PartialState().is_main_process:  # one summary, not one per process
        print(json.dumps({"out": args.out, "arms": arms}, indent=2))
    return 0
