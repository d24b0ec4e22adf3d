"""`slimwhisper` command line: convert, compress-encoder, info, transcribe, eval, finetune, bench, demo.

User mistakes (bad paths, unknown models, impossible ranks) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from .cliargs import (
    add_batch_size,
    add_device,
    add_engine_options,
    add_model,
    add_out,
    add_quiet,
    audio_share,
    check_out_path,
    output_folder,
    positive_int,
    resolve_device,
    resolve_model,
    staged_folder,
    write_text_atomic,
)
from .errors import SlimWhisperError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _modules(values: list[str]) -> tuple[str, ...]:
    return tuple(m for v in values for m in v.split(",") if m)


def _add_job_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """Arguments shared by the compression commands: calibration audio, output, device, progress."""
    p.add_argument("--calibration", help="calibration audio: file, folder or dataset (default: bundled clips)")
    p.add_argument("--calibration-limit", type=int, default=100, help="at most this many recordings (default 100)")
    add_out(p, out_help)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_device(p)
    add_quiet(p)


def _check_calibration(args: argparse.Namespace) -> None:
    """A --calibration path that does not exist is refused before the model is loaded."""
    if args.calibration and not Path(args.calibration).expanduser().exists():
        raise SlimWhisperError(f"--calibration {args.calibration} does not exist; give an audio file, a folder of "
                               "audio or a manifest (or leave it out for the bundled clips)")


def cmd_convert(args: argparse.Namespace) -> int:
    from . import MLAConfig, convert, load
    from .info import describe
    from .loading.processor import save_processor
    from .mla.config import default_allocation

    config = MLAConfig(
        modules=_modules(args.modules),
        kept_dims=args.kept_dims,
        latent_rank=args.latent_rank,
        latent_dim=args.latent_dim,
        kv_reduction=args.kv_reduction,
        selection=args.selection,
        factorization=args.factorization,
        damping=args.damping,
        allocation=args.allocation or default_allocation(args.kv_reduction, args.factorization),
    )
    out = output_folder(args.out, overwrite=args.overwrite, create=False)  # staged_folder makes it at the end
    _check_calibration(args)
    model, processor = load(args.model, device=resolve_device(args.device))
    slim = convert(
        model, config, calibration=args.calibration, calibration_limit=args.calibration_limit, progress=not args.quiet
    )
    with staged_folder(out) as tmp:
        slim.save_pretrained(tmp)
        save_processor(processor, tmp)
    summary = describe(slim.config)
    keys = ("kv_bytes_per_token", "cross_kv_bytes", "kv_reduction")
    print(json.dumps({"out": str(out), **{k: summary[k] for k in keys}}))
    return 0


def _attention_budget(args: argparse.Namespace, targets: tuple[str, ...]) -> float | None:
    """--attention-budget as a share of head dims, or None for whole heads. Not given, a --budget run in the hf
    layout narrows to `BUDGET_HEADS` when it gathers what narrowing reads (q, k and v); anything else keeps
    whole heads."""
    from .lowrank.config import ATTENTION_TARGETS, BUDGET_HEADS

    if args.attention_budget != "auto":
        return None if args.attention_budget in (None, 1.0) else args.attention_budget
    narrowable = all(t in targets for t in ATTENTION_TARGETS[:3])
    return BUDGET_HEADS if args.budget is not None and args.format == "hf" and narrowable else None


def head_share(text: str) -> float | str | None:
    """argparse type of --attention-budget: a number (a share in (0, 1]; `LowRankConfig` checks the range),
    "none" (whole heads, as 1) or "auto"."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a share such as 0.8, none or auto; got {text!r}") from None


def cmd_compress_encoder(args: argparse.Namespace) -> int:
    from . import convert, load
    from .info import describe
    from .loading.processor import save_processor
    from .lowrank import STATS_FILE, LowRankConfig, parse_theta, work_folder_for
    from .lowrank.config import TARGETS

    kwargs = {"energy": args.energy, "granule": args.granule, "audio_weight": args.audio_weight}
    if args.targets:
        kwargs["targets"] = _modules(args.targets)
    kwargs["attention_budget"] = _attention_budget(args, kwargs.get("targets", TARGETS))
    if args.theta is not None:
        kwargs["theta_attn"], kwargs["theta_mlp"] = parse_theta(args.theta)
    elif args.rank is not None:
        kwargs["rank"] = args.rank
    elif args.budget is not None:
        kwargs["budget"] = args.budget
        kwargs["allocation"] = args.allocation
    elif args.preset is not None:
        kwargs["preset"] = args.preset  # none given: LowRankConfig's default preset
    if sum(x is not None for x in (args.theta, args.rank, args.preset, args.budget)) > 1:
        raise SlimWhisperError("give only one of --preset, --theta, --rank, --budget")
    config = LowRankConfig(**kwargs)
    if args.format == "lite-whisper" and config.attention_budget is not None:
        raise SlimWhisperError("the lite-whisper layout has no narrowed heads: drop --attention-budget or save in "
                               "the hf format")
    out = output_folder(args.out, overwrite=args.overwrite, create=False)  # staged_folder makes it at the end
    _check_calibration(args)
    model, processor = load(args.model, device=resolve_device(args.device))
    calibration = args.stats if args.stats else args.calibration
    work = work_folder_for(out)  # finished layers of a killed run: the same command resumes from them
    with staged_folder(out) as tmp:
        slim = convert(model, config, calibration=calibration, calibration_limit=args.calibration_limit,
                       progress=not args.quiet, stats_out=tmp / STATS_FILE, work_dir=work,
                       stats_budget_bytes=int(args.stats_budget_gib * 2**30))
        if args.format == "lite-whisper":
            from .lowrank import save_lite_whisper

            save_lite_whisper(slim, tmp)
        else:
            slim.save_pretrained(tmp)
        save_processor(processor, tmp)
        shutil.rmtree(work, ignore_errors=True)  # everything is in tmp now
    summary = describe(slim.config)
    enc = summary["encoder_params"]
    print(json.dumps({"out": str(out), "encoder_params": enc, "encoder_ratio": enc["compressed"] / enc["original"],
                      "compressed_linears": len(summary["lowrank"]["ranks"]),
                      "linear_flops_kept": summary["lowrank"]["linear_flops_kept"],
                      "attention_flops_kept": summary["lowrank"]["attention_flops_kept"]}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe
    from .loading.api import is_lite_whisper, load_config

    path = Path(args.model)
    if (path / "config.json").is_file() and not (path / "model.bin").is_file() and not is_lite_whisper(path):
        config = load_config(path)  # the config alone: no need to read the weights
    else:
        from . import load

        config = load(args.model)[0].config
    summary = describe(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        kv, cross = summary["kv_bytes_per_token"], summary["cross_kv_bytes"]
        print(f"{args.model}: d_model {summary['d_model']}, {summary['decoder_layers']} decoder layers")
        print(f"  self-attention KV cache: {kv['original']} -> {kv['converted']} bytes/token (fp16)")
        print(f"  cross-attention KV cache: {cross['original']} -> {cross['converted']} bytes/utterance (fp16)")
        print(f"  parameters: {summary['parameters']['original']} -> {summary['parameters']['converted']}")
        if summary["lowrank"]:
            print(f"  low-rank encoder: {_lowrank_line(summary)}")
    return 0


def _lowrank_line(summary: dict) -> str:
    """The encoder's ranks per linear, its parameters and the share of linear FLOPs kept."""
    from .info import rank_summary
    from .lowrank.config import TARGETS

    lowrank, params = summary["lowrank"], summary["encoder_params"]
    targets = tuple(dict.fromkeys((*TARGETS, *((lowrank.get("recipe") or {}).get("targets") or ()))))
    line = f"{rank_summary(lowrank['ranks'], summary['encoder_layers'], targets)}; " \
           f"parameters {params['original']} -> {params['compressed']}"
    if lowrank.get("linear_flops_kept") is not None:
        line += f", {lowrank['linear_flops_kept']:.3f} of the linear FLOPs"
    if lowrank.get("head_dims"):
        dims = ", ".join(f"{name.split('.')[3]}: {d}" for name, d in lowrank["head_dims"].items())
        line += f"; head dims by layer {dims}, {lowrank['attention_flops_kept']:.3f} of the attention FLOPs"
    if lowrank.get("calibration"):
        line += f"; calibrated on {lowrank['calibration']} (finetune validates on it)"
    return line


def cmd_transcribe(args: argparse.Namespace) -> int:
    from . import load
    from .audio import load_audio
    from .decoding import check_engine_options

    if args.engine == "generate" and (args.out or args.format != "txt"):
        raise SlimWhisperError("--format and --out need the engine; drop --engine generate")
    check_engine_options(args.engine, args.quantize, args.kv_cache)
    audios = [load_audio(p) for p in args.audio]  # fail before loading the model
    out = _transcript_paths(args) if args.out else None
    model, processor = load(args.model, device=resolve_device(args.device))
    results = _transcribe(args, model, processor, audios)
    texts = [r if isinstance(r, str) else r.text for r in results]
    if out is not None or args.format != "txt":
        from .engine.formats import render

        if out:
            out[0].parent.mkdir(parents=True, exist_ok=True)
        for path, result in zip(out or [None] * len(results), results):
            if path is None:
                print(render(result, args.format), end="")
            else:
                write_text_atomic(path, render(result, args.format))
        if out is None or not args.json:
            return 0
    if args.json:
        rows = [{"file": f, "text": t} for f, t in zip(args.audio, texts)]
        for row, r in zip(rows, [r for r in results if not isinstance(r, str)]):
            row.update(language=r.language, duration=r.duration, segments=[vars(s) for s in r.segments])
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif out is None:
        for f, t in zip(args.audio, texts):
            print(f"{f}\t{t}")
    return 0


def _transcript_paths(args: argparse.Namespace) -> list[Path]:
    """One output file per input in the --out folder; two inputs may not claim the same file."""
    folder = output_folder(args.out, create=False)  # made once there is something to write
    paths = [folder / f"{Path(f).stem}.{args.format}" for f in args.audio]
    clash = [p.name for p in paths if paths.count(p) > 1]
    if clash:
        raise SlimWhisperError(f"two inputs would both write {clash[0]} in {folder}; rename one of them")
    return paths


def _transcribe(args: argparse.Namespace, model, processor, audios) -> list:
    """Texts (`--engine generate`) or `Transcription`s (the engine) of the audios."""
    from .tokens import TokenIds

    if args.language and args.language.lower() != "en" and not TokenIds.from_generation_config(
            model.generation_config).multilingual:
        raise SlimWhisperError(f"{args.model} is English-only; drop --language {args.language} or use a "
                               "multilingual model such as base")
    if args.engine == "generate":
        from .decoding import transcribe_arrays

        return transcribe_arrays(model, processor, audios, language=args.language, batch_size=args.batch_size,
                                 num_beams=args.beams, engine="generate")
    from .engine import Transcriber

    engine = Transcriber(model, processor, batch_size=args.batch_size, beam_size=args.beams, quantize=args.quantize,
                         vad=not args.no_vad, kv_cache=args.kv_cache)
    return engine.transcribe(audios, language=args.language, timestamps=args.timestamps, mode=args.mode,
                             condition_on_previous_text=args.condition_on_previous_text,
                             progress=not args.quiet and sum(len(a) for a in audios) > 60 * 16_000)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.out:
        output_folder(args.out, overwrite=False, create=False)  # refused before the slow part, not after it
    run_demo(DemoConfig(model=args.model, kv_reduction=args.kv_reduction, out=args.out))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: its usage block would bury the line that says what is wrong.

    add_subparsers makes every subcommand's parser of this same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The `slimwhisper` parser: one subcommand each, the eval, finetune and bench ones registered by their modules."""
    parser = _Parser(prog="slimwhisper", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(sub)
    _add_compress_encoder_parser(sub)
    _add_info_parser(sub)
    _add_transcribe_parser(sub)
    _add_demo_parser(sub)

    from .eval.cli import add_parser as add_eval_parser
    from .eval.cli import run as run_eval

    add_eval_parser(sub).set_defaults(func=run_eval)

    from .recovery.cli import add_parser as add_finetune_parser
    from .recovery.cli import run as run_finetune

    add_finetune_parser(sub).set_defaults(func=run_finetune)

    from .bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)  # each bench subcommand sets its own func
    return parser


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """`convert`: MLA conversion of the attention modules."""
    p = sub.add_parser("convert", help="convert attention to multi-head latent attention (MLA)")
    add_model(p)
    p.add_argument("--modules", nargs="+", default=["decoder_self"], help="decoder_self, decoder_cross, encoder_self")
    p.add_argument("--kv-reduction", type=float, help="fraction of the converted modules' KV cache to save, e.g. 0.75")
    p.add_argument("--kept-dims", type=int, default=0, help="key dims per head kept exact (default 0)")
    p.add_argument("--latent-rank", type=int, help="latent width per head")
    p.add_argument("--latent-dim", type=int, help="total latent width")
    p.add_argument("--selection", default="uniform", choices=["uniform", "high", "low", "2norm"])
    p.add_argument("--factorization", default="activation", choices=["activation", "joint", "split"])
    p.add_argument("--damping", type=float, default=0.1, help="activation-aware ridge (default 0.1; lower it "
                   "for calibration sets of thousands of utterances)")
    p.add_argument("--allocation", choices=["uniform", "greedy"],
                   help="greedy (default with --kv-reduction): --kv-reduction is a budget on one utterance's total "
                   "cache bytes, widths chosen per module by measured error per byte (needs calibration audio); "
                   "uniform (the paper's recipe, and the default with --latent-rank/--latent-dim): one latent "
                   "width for all")
    _add_job_args(p, "output directory (HF model + processor)")
    p.set_defaults(func=cmd_convert)


def _add_compress_encoder_parser(sub: argparse._SubParsersAction) -> None:
    """`compress-encoder`: low-rank encoder linears (LiteASR)."""
    from .lowrank.config import ALLOCATIONS, AUDIO_WEIGHT, BUDGET_HEADS

    p = sub.add_parser("compress-encoder", help="low-rank encoder by activation PCA (LiteASR)")
    add_model(p)
    p.add_argument("--preset", choices=["a", "b", "c"], help="a: quality (default), b: balanced, c: efficiency")
    p.add_argument("--theta", help="energy thresholds ATTN:MLP, e.g. 0.99:0.999 (one value: both)")
    p.add_argument("--rank", type=int, help="one fixed rank for every encoder linear")
    p.add_argument("--budget", type=float, help="keep this share of the encoder's linear FLOPs (e.g. 0.6), ranks "
                   "shared out as --allocation says")
    p.add_argument("--allocation", default=ALLOCATIONS[0], choices=ALLOCATIONS,
                   help="with --budget: one rank each for the q/k, v/out and MLP linears of every layer, the "
                   "combination whose encoder output errs least on the calibration audio (roles, default); one "
                   "rank for all linears (uniform); or ranks where the output error, probed one linear at a time, "
                   "grows least per FLOP saved (greedy)")
    p.add_argument("--attention-budget", type=head_share, default="auto", metavar="F",
                   help="also narrow the heads of encoder self-attention (fewer dimensions per head for scores and "
                   "values, so the attention over 1500 frames costs less) until the layers keep this share of their "
                   f"head dims (e.g. 0.8), where the encoder output errs least; 1 or none: heads stay whole "
                   f"(default: {BUDGET_HEADS} with --budget, else whole)")
    p.add_argument("--energy", default="squared", choices=["linear", "squared"],
                   help="rank energy: squared singular values (default, the paper) or singular values (linear)")
    p.add_argument("--granule", type=int, default=16, choices=[8, 16], help="ranks are multiples of this")
    p.add_argument("--audio-weight", type=audio_share, default=AUDIO_WEIGHT, metavar="W",
                   help=f"share of each padded calibration window's weight that its audio frames carry, the padding "
                   f"the rest (default {AUDIO_WEIGHT}; none: every frame alike, as LiteASR)")
    p.add_argument("--targets", nargs="+", help="linears of each encoder layer (default: self_attn.q_proj "
                   "self_attn.k_proj self_attn.v_proj self_attn.out_proj fc1 fc2)")
    p.add_argument("--stats", help="reuse saved statistics (encoder_stats.safetensors or a directory holding it)")
    p.add_argument("--format", default="hf", choices=["hf", "lite-whisper"], help="output layout (default hf)")
    p.add_argument("--stats-budget-gib", type=float, default=2.0, help="calibration statistics held at once "
                   "(default 2; layers are measured in groups that fit it)")
    _add_job_args(p, "output directory (model, processor, encoder_stats.safetensors)")
    p.set_defaults(func=cmd_compress_encoder)


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    """`info`: what a model's cache and parameters cost."""
    p = sub.add_parser("info", help="describe a model: cache bytes, geometry, parameters")
    add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def _add_transcribe_parser(sub: argparse._SubParsersAction) -> None:
    """`transcribe`: audio files to text, subtitles or JSON."""
    p = sub.add_parser("transcribe", help="transcribe audio files of any length")
    add_model(p)
    p.add_argument("audio", nargs="+", help="audio files (any common format and rate; stereo is mixed down)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {file, text, language, duration, segments}")
    p.add_argument("--language", help="language code for multilingual models (default: detect)")
    add_batch_size(p, 8, "30-s windows decoded together")
    p.add_argument("--beams", type=positive_int, default=1, help="beam size (default 1: greedy)")
    add_device(p)
    p.add_argument("--engine", choices=["fast", "generate"], default="fast",
                   help="fast: static-cache engine (default); generate: transformers' generate()")
    p.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt", help="output format")
    p.add_argument("--out", "--output-dir", dest="out", metavar="DIR",
                   help="write one FILE.FORMAT per input into this folder instead of printing")
    p.add_argument("--timestamps", action="store_true", help="predict segment timestamps")
    p.add_argument("--mode", choices=["batched", "sequential"], default="batched",
                   help="batched: speech cut at silences into windows decoded together (fast, default); "
                   "sequential: each window starts where the previous one's last segment ended")
    p.add_argument("--no-vad", action="store_true",
                   help="fixed 30-s windows instead of windows cut at the detector's silences (windows with "
                        "nothing audible are still skipped)")
    p.add_argument("--condition-on-previous-text", action="store_true",
                   help="sequential mode: prompt each window with the text before it")
    add_quiet(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_transcribe)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """`demo`: a one-command tour on bundled clips."""
    p = sub.add_parser("demo", help="convert tiny.en at 75%% and compare it with the original on bundled clips")
    add_model(p, required=False)
    p.set_defaults(model="tiny.en")
    p.add_argument("--kv-reduction", type=float, default=0.75)
    add_out(p, "also save the converted model in this folder", required=False)
    p.set_defaults(func=cmd_demo)


def _fail(message: str) -> int:
    """A user mistake: one line on stderr (messages quoting a library's multi-line text are folded), exit code 2."""
    print(f"slimwhisper: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate()'s deprecation chatter is not for our users
    hf_logging.disable_progress_bar()  # nor transformers' bar for loading a few hundred tensors
    try:
        resolve_model(args)
        if getattr(args, "out", None):
            check_out_path(args.out)  # every --out is a folder: refuse an impossible one before any work
        return int(args.func(args) or 0)
    except SlimWhisperError as exc:
        return _fail(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user named: a bug, shown in full
        return _fail(f"{exc.filename}: {exc.strerror or exc}; check the path, its permissions and the free disk space")
    except KeyboardInterrupt:
        print("slimwhisper: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A process of a multi-process run (accelerate launch, torchrun) leaves its process group before it exits:
    gloo's worker threads still alive while the interpreter shuts down can abort the process (SIGABRT) after
    all its work is done, and the launcher then reports the whole run as failed."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
