"""Low-rank encoder by FLOP budget: WER and encoder speed before and after recovery, each against its baseline.

For one model and each budget (the share of the encoder's linear FLOPs kept), `compress-encoder --budget`
converts it (the default allocation, `roles`, or every one of --allocations), `eval` scores it against the original,
and `bench encoder` times it against the original at batch 1 and 8, in float32 and with the engine's int8
linears. A budget given in --recover is then fine-tuned with the bare `finetune --control` (the low-rank
recipe: encoder distillation) and the recovered model is scored and timed against its control.

    python benchmarks/encoder_budget.py --model tiny.en --budgets 0.8 0.6 0.4 --recover 0.6 \
        --calibration ../shared/data/realspeech/manifest.jsonl --train ../shared/data/synth-en-train/manifest.jsonl \
        --data ../shared/data/realspeech/manifest.jsonl --language en --work runs/budget-tiny-en \
        --out benchmarks/results/lowrank-budget-tiny-en

Every step is a `slimwhisper` command whose output stays in --work, so a rerun resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from slimwhisper.bench.common import run_metadata, write_result
from slimwhisper.lowrank.config import ALLOCATIONS

BATCHES = (1, 8)
PRECISIONS = ("fp32", "int8")


def slimwhisper(*args: str) -> str:
    """Run one CLI command (the same Python), stopping the script with its message when it fails."""
    done = subprocess.run([sys.executable, "-m", "slimwhisper.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"slimwhisper {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def once(path: Path, *args: str) -> dict:
    """The JSON a command printed, kept in `path` so a rerun reads it instead of running again."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = slimwhisper(*args)
        path.write_text(text[text.index("{"):])
    return json.loads(path.read_text())


def evaluate(model: str, baseline: str, out: Path, args: argparse.Namespace) -> dict:
    """summary.json of `slimwhisper eval` against `baseline` (resumed when it already ran)."""
    if not (out / "summary.json").is_file():
        language = ["--language", args.language] if args.language else []
        slimwhisper("eval", model, "--data", args.data, *language, "--baseline", baseline, "--out", str(out), "--quiet")
    return json.loads((out / "summary.json").read_text())


def speeds(model: str, baseline: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Encoder speed-up against `baseline` per batch and precision ("b8 int8": ...)."""
    found = {}
    for batch in args.batches:
        for precision in args.precisions:
            quantize = ["--quantize", "int8"] if precision == "int8" else []
            result = once(work / f"bench-b{batch}-{precision}.json", "bench", "encoder", model, "--baseline", baseline,
                          "--batch", str(batch), "--repeats", str(args.repeats), "--profile-passes", "0", *quantize,
                          "--json")
            found[f"b{batch} {precision}"] = result["speedup"]["model"]
    return found


def row(label: str, budget: float, flops: float, summary: dict, speed: dict[str, float]) -> dict:
    return {"variant": label, "budget": budget, "linear_flops_kept": flops, "wer": summary["wer"],
            "baseline_wer": summary["baseline_wer"], "delta_wer": summary["delta_wer"],
            "significant": bool(summary.get("delta_wer_significant")), "speedup": speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--allocations", nargs="+", default=[ALLOCATIONS[0]], choices=ALLOCATIONS,
                   help="compress-encoder --allocation values (default: its default)")
    p.add_argument("--recover", type=float, nargs="*", default=[],
                   help="budgets to fine-tune (the first of --allocations)")
    p.add_argument("--calibration", required=True)
    p.add_argument("--audio-weight", default="0.8", help="compress-encoder --audio-weight (none: every frame alike)")
    p.add_argument("--attention-budget", default="auto",
                   help="compress-encoder --attention-budget (default: its default; none: heads stay whole)")
    p.add_argument("--train", help="training data for --recover")
    p.add_argument("--data", required=True, help="evaluation data (a manifest)")
    p.add_argument("--language", help="evaluate only this language")
    p.add_argument("--repeats", type=int, default=3, help="timed encoder passes per model and setting")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="encoder batch sizes timed")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="folder for result.json")
    args = p.parse_args()
    work = Path(args.work)
    rows = []
    for budget in args.budgets:
        for allocation in args.allocations:
            here = work / f"{budget:g}-{allocation}"
            model = str(here / "L")
            made = once(here / "compress.json", "compress-encoder", args.model, "--budget", str(budget), "--allocation",
                        allocation, "--calibration", args.calibration, "--audio-weight", args.audio_weight,
                        "--attention-budget", args.attention_budget, "--out", model, "--quiet")
            flops = made["linear_flops_kept"]
            summary = evaluate(model, args.model, here / "eval", args)
            rows.append(row(f"{allocation}, no fine-tuning", budget, flops, summary,
                            speeds(model, args.model, here, args)))
            if budget in args.recover and allocation == args.allocations[0]:
                ft = here / "FT"
                if not (ft / "control" / "config.json").is_file():
                    slimwhisper("finetune", model, "--train", args.train, "--control", "--out", str(ft), "--quiet")
                rows.append(row(f"{allocation}, recovered (against its control)", budget, flops,
                                evaluate(str(ft / "model"), str(ft / "control"), here / "eval-ft", args),
                                speeds(str(ft / "model"), str(ft / "control"), here / "ft", args)))
    header = ["budget", "variant", "linear FLOPs kept", "WER %", "baseline WER %", "Δ WER",
              *[f"encoder speed-up {k}" for k in rows[0]["speedup"]]]
    table = [[f"{r['budget']:g}", r["variant"], f"{r['linear_flops_kept']:.3f}", f"{100 * r['wer']:.2f}",
              f"{100 * r['baseline_wer']:.2f}", f"{100 * r['delta_wer']:+.2f}{' ✱' if r['significant'] else ''}",
              *[f"{v:.2f}x" for v in r["speedup"].values()]] for r in rows]
    write_result(args.out, {"title": f"{args.model}: low-rank encoder by FLOP budget", "header": header,
                            "rows": table, "points": rows, **run_metadata()})
    print(json.dumps({"out": args.out, "rows": len(rows)}))


if __name__ == "__main__":
    main()
