"""The arguments every command spells the same way: the model first, `--batch-size`, `--out`, `--device`, `--quiet`.

Each command's parser is built from these helpers, so one option has one name, one default and one meaning
across `convert`, `compress-encoder`, `info`, `transcribe`, `eval`, `finetune`, `bench ...` and `demo`.
Older spellings stay accepted as aliases (`--model`, `--batch`, `--no-progress`).
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        if getattr(args, "model", None) is not None and args.model != option:
            raise SlimWhisperError(f"two models given ({args.model} and --model {option}); give one")
        args.model = option
    if getattr(args, "model", None) is None and getattr(args, "model_required", False):
        raise SlimWhisperError(_no_model_hint(args))


def _no_model_hint(args: argparse.Namespace) -> str:
    """What to type when no model was named; for transcribe, argparse took a lone model for the audio."""
    audio = getattr(args, "audio", None)
    if audio and len(audio) == 1 and not Path(audio[0]).is_file():
        return f"no audio files given after the model {audio[0]}; name them, e.g. `slimwhisper transcribe " \
               f"{audio[0]} talk.wav`"
    if audio:
        return "name a model before the audio files, e.g. `slimwhisper transcribe tiny.en talk.wav`"
    command = " ".join(c for c in (getattr(args, "command", None), getattr(args, "bench_command", None)) if c)
    return f"name a model first, e.g. `slimwhisper {command or 'COMMAND'} tiny.en ...`"


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1: refused while parsing, before any model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def audio_share(text: str) -> float | None:
    """argparse type of `--audio-weight`-like options: a share in (0, 1], or "none" (every frame alike)."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a share such as 0.8, or none; got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share is in (0, 1], or none; got {text!r}")
    return value


def add_batch_size(p: argparse.ArgumentParser, default: int, help: str = "rows decoded (or timed) together") -> None:
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=default,
                   help=f"{help} (default {default})")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The engine's `--quantize` (int8 linears) and `--kv-cache` (int8 cache) options."""
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 linears (CPU)")
    p.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                   help="decoder cache storage: float (default) or int8 with a scale per position and head (CPU)")


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


def check_out_path(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Refuse an output path that can never be a folder, before any work and without creating anything: a file,
    a path under a file, or a path under a folder this user cannot write."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimWhisperError(f"{flag} {out} is a file; give a folder (it is created if missing)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SlimWhisperError(f"cannot create {flag} folder {out}: {existing} is a file; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = f"{flag} folder {out} is" if existing == out else f"cannot create {flag} folder {out}: {existing} is"
        raise SlimWhisperError(f"{where} not writable; choose another place")
    return out


def output_folder(path: str | os.PathLike[str], *, overwrite: bool | None = None, flag: str = "--out",
                  create: bool = True) -> Path:
    """`path` made ready as an output folder before any slow work: not a file, creatable, writable.

    overwrite=False refuses a folder that already holds files; None accepts it (a resumable job's folder).
    create=False only checks: for results `staged_folder` moves into place, so a run that fails leaves nothing.
    """
    out = check_out_path(path, flag)
    if overwrite is False and out.is_dir() and any(out.iterdir()):
        raise SlimWhisperError(f"{out} exists and is not empty; choose another {flag} or pass --overwrite")
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimWhisperError(f"cannot create {flag} folder {out} ({exc.strerror}); choose another place") from exc
    if not os.access(out, os.W_OK):
        raise SlimWhisperError(f"{flag} folder {out} is not writable; choose another place")
    return out


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Write a result folder as a hidden sibling, then move it into place in one rename: a job killed while
    writing leaves `out` as it was (empty or the previous result), never half-written."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)  # only reached with --overwrite: output_folder refused it otherwise
    os.replace(tmp, out)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and one rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no stray temporary file
        raise
