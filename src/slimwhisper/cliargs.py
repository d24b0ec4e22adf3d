"""The arguments every command spells the same way: the model first, `--batch-size`, `--out`, `--device`, `--quiet`.

Each command's parser is built from these helpers, so one option has one name, one default and one meaning
across `convert`, `compress-encoder`, `info`, `transcribe`, `eval`, `finetune`, `bench ...` and `demo`.
Older spellings stay accepted as aliases (`--model`, `--batch`, `--no-progress`).
"""
from __future__ import annotations

import argparse

from .errors import SlimWhisperError

MODEL_HELP = "tiny.en, base, a Hugging Face / CTranslate2 / lite-whisper folder, or a hub id"


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP, required: bool = True) -> None:
    """The model as the first positional argument; `--model` is accepted too (`resolve_model` merges them)."""
    p.add_argument("model", nargs="?", help=help)
    p.add_argument("--model", dest="model_option", metavar="MODEL", help=argparse.SUPPRESS)
    p.set_defaults(model_required=required)


def resolve_model(args: argparse.Namespace) -> None:
    """Merge the positional model and `--model` into `args.model`; refuse two different ones or none."""
    option = getattr(args, "model_option", None)
    if option is not None:
        if args.model is not None and args.model != option:
            raise SlimWhisperError(f"two models given ({args.model} and --model {option}); give one")
        args.model = option
    if args.model is None and getattr(args, "model_required", False):
        raise SlimWhisperError("name a model first, e.g. `slimwhisper COMMAND tiny.en ...`")


def add_batch_size(p: argparse.ArgumentParser, default: int, help: str = "rows decoded (or timed) together") -> None:
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=default,
                   help=f"{help} (default {default})")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one, else the CPU), cpu, cuda, "
                   "cuda:1, mps")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bars")


def add_out(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, metavar="DIR", help=help)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def resolve_device(name: str | None) -> str:
    """`--device`: as given, else (auto) the GPU when there is one (CUDA, then Apple's MPS), else the CPU."""
    if name and name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"
