"""Time of a rank-k factor pair against the dense linear it replaces, on one batch of encoder windows.

A low-rank linear runs [rows, d_in] x [d_in, k] and then [rows, k] x [k, d_out] in place of one
[d_in, d_out] product. Its FLOPs fall to k (d_in + d_out) / (d_in d_out) of the dense ones, but two thin
products run further from the machine's peak than one wide one, so below some saving a pair costs time
instead of saving it. This times `LowRankLinear` (the module the converted encoder runs) at each rank
against `nn.Linear`, interleaved, in one process, so the allocation's FLOP budget can be read as time.

    python benchmarks/linear_pairs.py --shape 512 512 --ranks 112 144 208 256 \
        --out benchmarks/results/linear-pairs-base-attention
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slimwhisper.bench.common import run_metadata, write_result
from slimwhisper.lowrank import LowRankLinear
from slimwhisper.lowrank.math import flops_kept


def modules(d_in: int, d_out: int, ranks: list[int], seed: int = 0) -> dict[str, nn.Module]:
    """The dense linear and a random factor pair per rank (timing needs shapes, not trained weights)."""
    torch.manual_seed(seed)
    found: dict[str, nn.Module] = {"dense": nn.Linear(d_in, d_out)}
    for k in ranks:
        found[f"rank {k}"] = LowRankLinear(d_in, d_out, k)
    return {name: m.eval() for name, m in found.items()}


@torch.inference_mode()
def median_ms(mods: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each module, the modules taking turns so drift hits all alike."""
    for m in mods.values():
        m(x)  # warm-up: first-call allocations and kernel choice
    times: dict[str, list[float]] = {name: [] for name in mods}
    for _ in range(repeats):
        for name, m in mods.items():
            start = time.perf_counter()
            m(x)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, required=True, metavar=("D_IN", "D_OUT"))
    p.add_argument("--ranks", type=int, nargs="+", required=True)
    p.add_argument("--rows", type=int, default=8 * 1500, help="input rows (default: 8 windows of 1500 frames)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out")
    args = p.parse_args()
    d_in, d_out = args.shape
    mods = modules(d_in, d_out, args.ranks)
    ms = median_ms(mods, torch.randn(args.rows, d_in), args.repeats)
    rows = []
    for name, t in ms.items():
        flops = flops_kept({name: getattr(mods[name], "rank", None)}, {name: (d_in, d_out)})
        rows.append([name, f"{flops:.2f}", f"{t:.2f}", f"{t / ms['dense']:.2f}"])
        print(rows[-1], flush=True)
    result = {
        "title": f"a rank-k factor pair against its dense [{d_in}, {d_out}] linear, {args.rows} rows, float32",
        "header": ["linear", "FLOPs vs dense", "ms per call", "time vs dense"],
        "rows": rows,
        **run_metadata(shape=args.shape, ranks=args.ranks, rows=args.rows, repeats=args.repeats,
                       threads=torch.get_num_threads()),
        "inputs": f"random weights; medians of {args.repeats} interleaved calls after one warm-up each.",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
