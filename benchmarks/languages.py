"""Per-language cost of a recovered model against its paired control, in the model card's form.

Evaluates a `slimwhisper finetune --control` output (DIR/model against DIR/control) on a multilingual
manifest, each clip in its own language, and optionally the compressed model before recovery against
the original; writes one row per language (clips, words, WER and CER of both, Δ WER with its paired
bootstrap interval, ✱ = significant) and the median and worst Δ WER over the languages in --summary.

    python benchmarks/languages.py --recovered runs/ft-base-875 --before runs/base-875 --original base \
        --data ../shared/data/realspeech/manifest.jsonl --work runs/languages-base-875 \
        --out benchmarks/results/languages-base-mla875

Every evaluation is a `slimwhisper eval` whose output stays in --work, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kv_pareto import evaluate

from slimwhisper.bench.common import run_metadata, write_result


def signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def language_rows(recovered: dict, before: dict | None) -> list[dict]:
    """One dict per language of the recovered model's summary, with the before-recovery figures beside it."""
    rows = []
    for lang, s in sorted(recovered["languages"].items(), key=lambda kv: (-kv[1]["n_utterances"], kv[0])):
        label = f"{lang} (CER)" if s.get("primary") == "cer" else lang  # scored by characters (zh, ja, ...)
        row = {"language": label, "clips": s["n_utterances"], "words": s["n_words"], "wer": s["wer"], "cer": s["cer"],
               "control_wer": s["baseline_wer"], "control_cer": s["baseline_cer"], "delta_wer": s["delta_wer"],
               "delta_wer_ci": s["delta_wer_ci"], "mark": s.get("delta_wer_mark", ""), "delta_cer": s["delta_cer"]}
        b = (before or {}).get("languages", {}).get(lang)
        if b:
            row.update(before_wer=b["wer"], original_wer=b["baseline_wer"], before_delta_wer=b["delta_wer"],
                       before_mark=b.get("delta_wer_mark", ""))
        rows.append(row)
    return rows


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        lo, hi = r["delta_wer_ci"]
        mark = f" {r['before_mark']}" if r.get("before_mark") else ""
        before = f"{100 * r['before_wer']:.2f} ({signed(r['before_delta_wer'])}{mark})" if "before_wer" in r else ""
        out.append([r["language"], str(r["clips"]), str(r["words"]), f"{100 * r['wer']:.2f}",
                    f"{100 * r['control_wer']:.2f}",
                    f"{signed(r['delta_wer'])} [{signed(lo)}, {signed(hi)}]{' ' + r['mark'] if r['mark'] else ''}",
                    f"{100 * r['cer']:.2f}", f"{100 * r['control_cer']:.2f}", signed(r["delta_cer"]), before])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recovered", required=True, help="a `slimwhisper finetune --control` output folder")
    p.add_argument("--before", help="the compressed model before recovery (evaluated against --original)")
    p.add_argument("--original", help="the uncompressed original (needed with --before)")
    p.add_argument("--data", required=True, help="evaluation data: a manifest whose clips name their language")
    p.add_argument("--summary", nargs="+", default=["de", "fr", "es", "pt"],
                   help="languages whose median and worst Δ WER are reported (default de fr es pt)")
    p.add_argument("--title", default="per-language cost against the paired control")
    p.add_argument("--work", required=True, help="folder for the evaluations")
    p.add_argument("--out", required=True, help="folder for result.json")
    args = p.parse_args()
    if args.before and not args.original:
        p.error("--before needs --original")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_args = argparse.Namespace(data=args.data, language=None)
    recovered = evaluate(f"{args.recovered}/model", work / "recovered", eval_args, "float", f"{args.recovered}/control")
    before = evaluate(args.before, work / "before", eval_args, "float", args.original) if args.before else None
    rows = language_rows(recovered, before)
    chosen = [r["delta_wer"] for r in rows if r["language"] in args.summary]
    summary = ({"languages": [r["language"] for r in rows if r["language"] in args.summary],
                "median_delta_wer": statistics.median(chosen), "worst_delta_wer": max(chosen)} if chosen else {})
    header = ["language", "clips", "words", "WER %", "control WER %", "Δ WER [95% CI]", "CER %", "control CER %",
              "Δ CER", "before recovery: WER % (Δ vs original)"]
    table = table_rows(rows)
    if summary:
        table.append([f"median over {', '.join(summary['languages'])}", "", "", "", "",
                      f"{signed(summary['median_delta_wer'])} (worst {signed(summary['worst_delta_wer'])})",
                      "", "", "", ""])
    result = {"title": args.title, "header": header, "rows": table, "languages": rows, "summary": summary,
              **run_metadata()}
    write_result(args.out, result)
    print("\n".join(" | ".join(row) for row in [header, *table]))


if __name__ == "__main__":
    main()
