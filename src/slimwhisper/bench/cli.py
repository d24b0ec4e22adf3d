"""`slimwhisper bench {decode,kv,encoder,e2e,calibrate} ...`: each subcommand lives in its own module of this package.

Every module exposes `add_parser(subparsers)` (returning the parser) and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = ("decode", "kv", "encoder", "e2e", "calibrate")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` and its subcommands (modules that do not exist yet are skipped)."""
    p = subparsers.add_parser("bench", help="benchmarks: decode speed, KV memory, encoder speed, end to end, "
                              "calibration memory")
    sub = p.add_subparsers(dest="bench_command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.add_parser(sub).set_defaults(func=module.run)
    return p
