"""KV-cache memory of MHA vs MLA: analytic bytes, bytes held by a real cache, largest batch in a budget, peak RSS.

For each model: the original and MLA conversions at each reduction, self-attention only and (with
--with-cross) self + cross attention; weight-only "joint" factorisation (bytes do not depend on the
weights). Analytic bytes (`slimwhisper.memory.kv_cache_bytes`, fp16 by default) for every batch x
length; the bytes a prefilled cache actually holds in the model dtype (checked equal to the formula);
the largest batch whose cache fits --budget-gib at the longest length. With --rss-batch, each variant
also runs `generate` on that many random 30-s inputs for --rss-tokens tokens (EOT suppressed, so every
variant decodes the same number of tokens) in a fresh process and reports its peak RSS.
Writes OUT/kv_memory.json, OUT/kv_memory.md and OUT/kv_bytes_vs_batch_<model>.png.

    python benchmarks/kv_memory.py --models tiny.en base --reductions 0.75 0.875 --with-cross \
        --rss-batch 8 --rss-tokens 100 --out runs/bench/kv
    python benchmarks/kv_memory.py --render runs/bench/kv/kv_memory.json
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import slimwhisper as sw
from slimwhisper.bench.common import peak_rss_bytes, reset_peak_rss, rss_high_water_bytes, run_metadata, write_json
from slimwhisper.bench.kv import DTYPES, bench_kv

GIB, MIB = 2**30, 2**20


def variants(name: str, reductions: list[float], with_cross: bool, out: Path) -> dict[str, Path | str]:
    """Save each MLA conversion of `name` under OUT/models/ (for the RSS child processes); name -> path."""
    base, processor = sw.load(name)
    paths: dict[str, Path | str] = {"baseline": name}
    for reduction in reductions:
        for cross in (False, True) if with_cross else (False,):
            key = f"mla{reduction * 100:g}" + ("_cross" if cross else "")
            path = out / "models" / f"{name}-{key}"
            if not (path / "config.json").is_file():
                modules = ("decoder_self", "decoder_cross") if cross else ("decoder_self",)
                cfg = sw.MLAConfig(kv_reduction=reduction, factorization="joint", modules=modules)
                slim = sw.convert(base, cfg, progress=False)
                slim.save_pretrained(path)
                processor.save_pretrained(path)
            paths[key] = path
    return paths


def rss_child(model_path: str, batch: int, tokens: int) -> None:
    """(In a fresh process) peak RSS of loading `model_path` and generating `tokens` tokens for `batch` inputs."""
    torch.manual_seed(0)
    model, _ = sw.load(model_path)
    features = torch.randn(batch, model.config.num_mel_bins, 3000) * 0.5
    gc.collect()
    load_peak = peak_rss_bytes()
    reset = reset_peak_rss()  # loading peaks above what generate needs; measure generate on its own
    before = rss_high_water_bytes()
    eot = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(features, max_new_tokens=tokens, suppress_tokens=[eot], return_dict_in_generate=True)
    print(json.dumps({"peak_rss": rss_high_water_bytes(), "rss_before_generate": before, "load_peak_rss": load_peak,
                      "peak_reset": reset, "sequence_length": int(out.sequences.shape[1])}))


def measure_rss(path: Path | str, batch: int, tokens: int, threads: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--rss-batch", str(batch), "--rss-tokens", str(tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def render_markdown(result: dict[str, Any]) -> str:
    """Tables for BENCHMARKS.md: bytes per token/frame, cache at the longest length, largest batch, RSS."""
    dtype, budget = result["dtype"], result["budget_bytes"] / GIB
    length = result["budget_length"]
    batches = sorted({row["batch"] for m in result["models"].values() for v in m["kv"]["models"].values()
                      for row in v["table"]})
    big = max(batches)
    lines = [
        f"Cache dtype {dtype}; cross attention holds 1500 encoder frames per utterance. Largest batch = cache bytes "
        f"only (no weights or activations) within {budget:g} GiB at {length} tokens. Held = bytes of a real "
        "prefilled `EncoderDecoderCache` (model dtype), compared with the formula.",
        "",
        f"| model | variant | self B/token | cross B/frame | self MiB at batch {big}, {length} tok | "
        f"self+cross MiB at batch {big} | largest batch (self) | largest batch (self+cross) | held = formula |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, m in result["models"].items():
        for name, v in m["kv"]["models"].items():
            row = next(r for r in v["table"] if r["batch"] == big and r["length"] == length)
            fit = v["max_batch_in_budget"]
            held = v.get("held_check", {}).get("equal")
            lines.append(
                f"| {model} | {label(name)} | {v['self_bytes_per_token']:,} | {v['cross_bytes_per_frame']:,} | "
                f"{row['self'] / MIB:,.0f} | {row['total'] / MIB:,.0f} | {fit['self']:,} | {fit['self_cross']:,} | "
                f"{'yes' if held else 'NO' if held is False else ''} |"
            )
    rss_rows = [(model, name, r) for model, m in result["models"].items() for name, r in m.get("rss", {}).items()]
    if rss_rows:
        s = result["settings"]
        lines += [
            "",
            f"Peak RSS of `generate` on {s['rss_batch']} random 30-s inputs, {s['rss_tokens']} new tokens each "
            "(EOT suppressed), fp32, one fresh process per variant; the RSS high-water mark is reset after loading "
            "(Linux clear_refs), so the peak is that of generate (encoder + decoding + caches) on top of the weights:",
            "",
            "| model | variant | peak RSS during generate MiB | RSS before generate MiB | generate adds MiB |",
            "|---|---|---|---|---|",
        ]
        for model, name, r in rss_rows:
            peak, loaded = r["peak_rss"] / MIB, r["rss_before_generate"] / MIB
            lines.append(f"| {model} | {label(name)} | {peak:,.0f} | {loaded:,.0f} | {peak - loaded:,.0f} |")
    return "\n".join(lines) + "\n"


def label(name: str) -> str:
    if name == "baseline":
        return "original (MHA)"
    core = name.split("_")[0]
    return f"MLA {core[3:]}%" + (" self+cross" if name.endswith("_cross") else " self")


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Per model: KV bytes vs batch at the longest length, self only (solid) and self + cross (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    length = result["budget_length"]
    for model, m in result["models"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, v) in enumerate(m["kv"]["models"].items()):
            rows = sorted((r for r in v["table"] if r["length"] == length), key=lambda r: r["batch"])
            xs = [r["batch"] for r in rows]
            color = f"C{i}"
            ax.plot(xs, [r["self"] / MIB for r in rows], marker="o", color=color, label=f"{label(name)}: self")
            ax.plot(xs, [r["total"] / MIB for r in rows], marker="x", linestyle="--", color=color,
                    label=f"{label(name)}: self+cross")
        ax.axhline(result["budget_bytes"] / MIB, color="grey", linewidth=0.8, label="budget")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(f"KV cache MiB ({result['dtype']}, {length} tokens)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"kv_bytes_vs_batch_{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    p.add_argument("--reductions", nargs="+", type=float, default=[0.75, 0.875])
    p.add_argument("--with-cross", action="store_true", help="also MLA on decoder cross-attention")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 200, 300, 448])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    p.add_argument("--budget-gib", type=float, default=1.0)
    p.add_argument("--rss-batch", type=int, help="also measure peak RSS of generate at this batch")
    p.add_argument("--rss-tokens", type=int, default=100)
    p.add_argument("--rss-models", nargs="+", help="models to measure RSS for (default: all --models)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="runs/bench/kv")
    p.add_argument("--render", help="only render tables and plots from this kv_memory.json")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.rss_child:
        rss_child(a.rss_child, a.rss_batch, a.rss_tokens)
        return
    if a.render:
        result = json.loads(Path(a.render).read_text())
        out = Path(a.render).parent
    else:
        out = Path(a.out)
        result = run_metadata(rss_batch=a.rss_batch, rss_tokens=a.rss_tokens, factorization="joint")
        result.update(dtype=a.dtype, budget_bytes=int(a.budget_gib * GIB), budget_length=max(a.lengths), models={})
        for name in a.models:
            paths = variants(name, a.reductions, a.with_cross, out)
            models = {key: sw.load(path)[0].eval() for key, path in paths.items()}
            entry = {"kv": bench_kv(models, a.batches, a.lengths, DTYPES[a.dtype], int(a.budget_gib * GIB))}
            if a.rss_batch and name in (a.rss_models or a.models):
                entry["rss"] = {}
                for key, path in paths.items():
                    entry["rss"][key] = measure_rss(path, a.rss_batch, a.rss_tokens, a.threads)
                    print(name, key, entry["rss"][key], flush=True)
            result["models"][name] = entry
            write_json(out / "kv_memory.json", result)
    (out / "kv_memory.md").write_text(render_markdown(result))
    plot(result, out)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
