"""`slimwhisper finetune MODEL_DIR --train MANIFEST [--control] --out DIR` (stub, being built)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `finetune` subcommand."""
    p = subparsers.add_parser("finetune", help="recovery fine-tuning of a compressed model (with a paired control)")
    return p


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
