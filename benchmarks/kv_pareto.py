"""WER against the whole decoder cache of an utterance: MLA self-only and self+cross, before and after recovery.

For one model, converts it at every KV reduction for decoder self-attention alone and for self + cross
attention (the default activation-aware recipe, its budget spread as --allocation says, no fine-tuning),
evaluates every variant with the float and the int8 engine cache, adds the recovered models given with
--recovered (each against its paired control), and writes a table and a plot of WER against the
decoder's KV bytes per utterance: 448 self-attention positions plus one 30-s cross-attention window,
fp16 for the float cache, int8 numbers plus float32 scales for the int8 cache (`slimwhisper info --json`).

    python benchmarks/kv_pareto.py --model tiny.en --data ../shared/data/realspeech/manifest.jsonl \
        --language en --work runs/kv-pareto-tiny-en --out benchmarks/results/pareto-tiny-en \
        --recovered "self+cross 87.5%=runs/ft-tiny-875"

Every step is a `slimwhisper` command whose output stays in --work, so a rerun resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from slimwhisper.bench.common import run_metadata, write_result

REDUCTIONS = (0.5, 0.75, 0.875, 0.9375)
MODULES = {"self": "decoder_self", "self+cross": "decoder_self,decoder_cross"}
CACHES = ("float", "int8")
TOKENS = 448


def slimwhisper(*args: str) -> str:
    """Run one CLI command (the same Python), stopping the script with its message when it fails."""
    done = subprocess.run([sys.executable, "-m", "slimwhisper.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"slimwhisper {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def utterance_bytes(model: str) -> dict[str, int]:
    """Decoder KV bytes of one utterance (448 positions + one window), float (fp16) and int8 cache."""
    info = json.loads(slimwhisper("info", model, "--json"))
    self_, cross = info["kv_bytes_per_token"], info["cross_kv_bytes"]
    return {"float": TOKENS * self_["converted"] + cross["converted"],
            "int8": TOKENS * self_["converted_int8_cache"] + cross["converted_int8_cache"],
            "original": TOKENS * self_["original"] + cross["original"]}


def evaluate(model: str, out: Path, args: argparse.Namespace, cache: str, baseline: str | None = None) -> dict:
    """summary.json of `slimwhisper eval` (resumed when it already ran)."""
    if not (out / "summary.json").is_file():
        extra = ["--baseline", baseline] if baseline else []
        language = ["--language", args.language] if args.language else []
        slimwhisper("eval", model, "--data", args.data, *language, "--kv-cache", cache, "--out", str(out),
                    "--quiet", *extra)
    return json.loads((out / "summary.json").read_text())


def convert(model: str, modules: str, reduction: float, out: Path, calibration: str, allocation: str) -> str:
    if not (out / "config.json").is_file():
        slimwhisper("convert", "--model", model, "--modules", modules, "--kv-reduction", str(reduction),
                    "--allocation", allocation, "--calibration", calibration, "--out", str(out), "--quiet")
    return str(out)


def rows_for(label: str, model: str, work: Path, args: argparse.Namespace, baseline: str | None = None) -> list[dict]:
    """One row per cache kind: bytes, WER, CER (and the cost against `baseline` when given)."""
    nbytes = utterance_bytes(model)
    rows = []
    for cache in CACHES:
        s = evaluate(model, work / f"eval-{cache}", args, cache, baseline)
        row = {"variant": label, "cache": cache, "bytes": nbytes[cache], "fraction": nbytes[cache] / nbytes["original"],
               "wer": s["wer"], "cer": s["cer"]}
        if baseline:
            row.update(control_wer=s["baseline_wer"], delta_wer=s["delta_wer"], delta_wer_ci=s["delta_wer_ci"],
                       significant=s["delta_wer_significant"])
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(row: dict) -> str:
        words = row["variant"].split(" ")
        return "control" if words[0] == "control" else f"{words[0]}, recovered" if "recovered" in row["variant"] \
            else words[0]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, cache), marker in zip(sorted({(group(r), r["cache"]) for r in rows}), "osD^v<>p*hX"):
        pts = [r for r in rows if group(r) == name and r["cache"] == cache]
        ax.scatter([r["bytes"] / 2**20 for r in pts], [100 * min(r["wer"], 0.5) for r in pts], marker=marker,
                   label=f"{name}, {cache} cache", s=36)
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["bytes"], r["wer"])):
        if r["wer"] < best:
            front.append(r)
            best = r["wer"]
    ax.plot([r["bytes"] / 2**20 for r in front], [100 * min(r["wer"], 0.5) for r in front], "k--", lw=1,
            label="Pareto front")
    ax.set(xscale="log", xlabel="decoder KV MiB per utterance (448 tokens + one 30-s window)",
           ylabel="WER % (capped at 50 for display)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="evaluation data (a manifest)")
    p.add_argument("--language", help="evaluate only this language")
    p.add_argument("--calibration", help="calibration audio for the conversions (default: --data)")
    p.add_argument("--reductions", type=float, nargs="+", default=list(REDUCTIONS))
    p.add_argument("--allocation", choices=("greedy", "uniform"), default="greedy",
                   help="how each conversion spreads its budget (default greedy, as `slimwhisper convert` does)")
    p.add_argument("--recovered", nargs="*", default=[], metavar="LABEL=DIR",
                   help="`slimwhisper finetune --control` outputs: DIR/model against DIR/control")
    p.add_argument("--work", required=True, help="folder for the converted models and evaluations")
    p.add_argument("--out", required=True, help="folder for result.json and pareto.png")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_for("original", args.model, work / "original", args)
    for name, modules in MODULES.items():
        for r in args.reductions:
            folder = work / f"{name}-{r}-{args.allocation}"
            model = convert(args.model, modules, r, folder, args.calibration or args.data, args.allocation)
            rows += rows_for(f"{name} {100 * r:g}%, no fine-tuning", model, folder, args)
    for spec in args.recovered:
        label, folder = spec.split("=", 1)
        rows += rows_for(f"{label}, recovered", f"{folder}/model", work / f"recovered-{label}", args,
                         baseline=f"{folder}/control")
        rows += rows_for(f"control of {label}", f"{folder}/control", work / f"control-{label}", args)
    plot(rows, out / "pareto.png", f"{args.model}: WER against decoder KV bytes")
    header = ["variant", "cache", "KV MiB / utterance", "of original", "WER %", "CER %", "Δ WER vs control"]
    table = [[r["variant"], r["cache"], f"{r['bytes'] / 2**20:.2f}", f"{100 * r['fraction']:.1f}%",
              f"{100 * r['wer']:.2f}", f"{100 * r['cer']:.2f}",
              f"{100 * r['delta_wer']:+.2f}{' ✱' if r['significant'] else ''}" if "delta_wer" in r else ""]
             for r in rows]
    write_result(str(out), {"header": header, "rows": table, "points": rows, "plot": "pareto.png",
                            **run_metadata(allocation=args.allocation)})
    print(json.dumps({"out": str(out), "points": len(rows)}))


if __name__ == "__main__":
    main()
