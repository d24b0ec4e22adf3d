"""Decode speed grid: MHA vs MLA (absorbed and materialised decode) over batch x cache length, as in-run ratios.

For each model, the original and its MLA conversions at each KV reduction are timed together at each
(batch, cache length) cell, interleaved (A B C ... A B C ...), medians of --repeats steps after a
warm-up; see `slimwhisper.bench.decode` for what one step is (ms per decode step of the whole batch).
Conversions use the weight-only "joint" factorisation: speed does not depend on the weights, and it
skips calibration. Writes OUT/decode_speed.json, OUT/decode_speed.md (tables for BENCHMARKS.md) and
OUT/decode_ms_vs_batch_<model>.png / OUT/decode_tokens_per_s_<model>.png.

    python benchmarks/decode_speed.py --models tiny.en base --reductions 0.75 0.875 \
        --batches 1 8 32 --cache-lens 64 200 400 --caches dynamic static --threads 2 --out runs/bench/decode
    python benchmarks/decode_speed.py --render runs/bench/decode/decode_speed.json   # tables + plots only
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import slimwhisper as sw
from slimwhisper.bench.common import load_for_bench, run_metadata, set_threads, write_json
from slimwhisper.bench.decode import CACHE_KINDS, time_decode
from slimwhisper.engine.quantize import QUANTIZE_CHOICES, quantize


def variant_name(reduction: float, cross: bool) -> str:
    return f"mla{reduction * 100:g}" + ("_cross" if cross else "")


def split_entry(entry: str, caches: list[str]) -> tuple[str, str]:
    """("mla75_materialized", "static") from "mla75_materialized_static" (first cache kind has no suffix)."""
    for kind in caches[1:]:
        if entry.endswith(f"_{kind}"):
            return entry[: -len(kind) - 1], kind
    return entry, caches[0]


def variant_label(name: str) -> str:
    """"mla87.5_cross_materialized" -> "MLA 87.5% self+cross materialised"."""
    if name.startswith("baseline"):
        return "MHA" + name[len("baseline"):].replace("_", " ")
    core = name.split("_")[0]
    label = f"MLA {core[3:]}%"
    if "_cross" in name:
        label += " self+cross"
    if "_materialized" in name:
        label += " materialised"
    if "_unfolded" in name:
        label += " unfolded"
    return label


def run_grid(a: argparse.Namespace) -> dict[str, Any]:
    threads = set_threads(a.threads)
    result: dict[str, Any] = run_metadata(threads=threads, repeats=a.repeats, warmup=a.warmup, caches=a.caches,
                                          factorization="joint", dtype=a.dtype, quantize=a.quantize)
    result["cells"] = []
    for name in a.models:
        base = load_for_bench(name, a.device, a.dtype)
        models = {"baseline": base}
        for reduction in a.reductions:
            for cross in (False, True) if a.with_cross else (False,):
                modules = ("decoder_self", "decoder_cross") if cross else ("decoder_self",)
                cfg = sw.MLAConfig(kv_reduction=reduction, factorization="joint", modules=modules)
                models[variant_name(reduction, cross)] = sw.convert(base, cfg, progress=False).eval()
        if a.quantize:  # as the engine runs them (MLA up-projections stay float)
            models = {key: quantize(m, a.quantize) for key, m in models.items()}
        for batch in a.batches:
            for cache_len in a.cache_lens:
                cell = time_decode(models, batch=batch, cache_len=cache_len, repeats=a.repeats, warmup=a.warmup,
                                   caches=tuple(a.caches), materialized=not a.no_materialized)
                cell["model"] = name
                result["cells"].append(cell)
                gc.collect()
                ms = cell["ms_per_token"]
                print(f"{name} batch={batch} cache={cache_len}: "
                      + ", ".join(f"{k}={v:.1f}ms" for k, v in ms.items()), flush=True)
                write_json(Path(a.out) / "decode_speed.json", result)  # partial results survive a crash
        del models, base
        gc.collect()
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """Table for BENCHMARKS.md: ms per decode step of MHA and each variant's speedup over MHA with the same cache."""
    cells = result["cells"]
    if not cells:
        return ""
    caches = cells[0]["caches"]
    variants = list(dict.fromkeys(split_entry(k, caches)[0] for k in cells[0]["ms_per_token"]))
    variants.remove("baseline")
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads; "
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}; "
        f"commit {result['commit']}."
        + (f" Models quantised: {settings['quantize']}." if settings.get("quantize") else "")
        + f" Median of {settings['repeats']} interleaved steps after {settings['warmup']} "
        "warm-up round(s); ms per decode step of the whole batch (one new token per sequence + LM head), "
        f"cross-attention over {cells[0]['encoder_frames']} frames. Speedup = MHA time / variant time with the same "
        "cache kind (> 1 = faster), from medians, then in brackets from the fastest repeats (interference only "
        "adds time, so the minimum is less sensitive to load); dynamic = HF DynamicCache (concatenates every "
        "step, as generate), static = preallocated buffers, engine = the Transcriber's own decode step.",
        "",
        "| model | cache | batch | cache len | MHA ms/step | " + " | ".join(variant_label(v) for v in variants) + " |",
        "|---|---|---|---|---|" + "---|" * len(variants),
    ]
    for kind in caches:
        for cell in cells:
            ms = {split_entry(k, caches): v for k, v in cell["ms_per_token"].items()}
            best = {split_entry(k, caches): v for k, v in cell.get("min_ms_per_token", cell["ms_per_token"]).items()}
            base, base_best = ms[("baseline", kind)], best[("baseline", kind)]
            row = [cell["model"], kind, str(cell["batch"]), str(cell["cache_len"]), f"{base:.1f}"]
            row += [f"{base / ms[(v, kind)]:.2f}x ({base_best / best[(v, kind)]:.2f}x)" if (v, kind) in ms else ""
                    for v in variants]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Per model: ms per step and tokens/s vs batch at the longest cache length, one line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in dict.fromkeys(c["model"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["model"] == model]
        longest = max(c["cache_len"] for c in cells)
        cells = sorted((c for c in cells if c["cache_len"] == longest), key=lambda c: c["batch"])
        for key, ylabel, fname in (("ms_per_token", "ms per decode step (whole batch)", "decode_ms_vs_batch"),
                                   ("tokens_per_s", "tokens / s", "decode_tokens_per_s")):
            fig, ax = plt.subplots(figsize=(6, 4))
            caches = cells[0]["caches"]
            colors: dict[str, str] = {}
            for entry in cells[0][key]:
                variant, kind = split_entry(entry, caches)
                color = colors.setdefault(variant, f"C{len(colors)}")
                ax.plot([c["batch"] for c in cells], [c[key][entry] for c in cells], marker="o", color=color,
                        linestyle="-" if kind == caches[0] else "--", label=f"{variant_label(variant)} ({kind})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}, cache {longest} tokens, {result['machine']['threads']} threads")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{fname}_{model}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    p.add_argument("--reductions", nargs="+", type=float, default=[0.75, 0.875])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--cache-lens", nargs="+", type=int, default=[64, 200, 400])
    p.add_argument("--caches", nargs="+", choices=CACHE_KINDS, default=["dynamic"],
                   help="dynamic (as generate), static (in-place buffers), engine (the Transcriber's decode step)")
    p.add_argument("--with-cross", action="store_true", help="also MLA on decoder cross-attention")
    p.add_argument("--no-materialized", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantise every model as the engine does (CPU)")
    p.add_argument("--out", default="runs/bench/decode")
    p.add_argument("--render", help="only render tables and plots from this decode_speed.json")
    a = p.parse_args()
    if a.render:
        result = json.loads(Path(a.render).read_text())
        out = Path(a.render).parent
    else:
        result = run_grid(a)
        out = Path(a.out)
    (out / "decode_speed.md").write_text(render_markdown(result))
    plot(result, out)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
