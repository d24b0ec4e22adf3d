"""MLA conversion without fine-tuning: WER vs KV-cache reduction, activation-aware vs weight-only SVD.

For each model, evaluates the original once, then every (factorisation, reduction) variant of decoder
self-attention on the same samples; reports corpus WER and the paired-bootstrap delta against the
original. Results go to OUT/results.json and OUT/results.md; every evaluation is resumable.

    python benchmarks/mla_conversion.py --models tiny.en base \
        --data ../shared/data/realspeech/manifest.jsonl --language en --out runs/mla_conversion
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import slimwhisper as sw
from slimwhisper.data import open_dataset
from slimwhisper.eval import evaluate, paired_bootstrap
from slimwhisper.mla import calibrate_mla


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["tiny.en", "base"])
    reductions: list[float] = field(default_factory=lambda: [0.5, 0.625, 0.75, 0.875])
    factorizations: list[str] = field(default_factory=lambda: ["activation", "joint"])
    modules: tuple[str, ...] = ("decoder_self",)
    data: str = "../shared/data/realspeech/manifest.jsonl"
    language: str | None = "en"
    calibration: str | None = None  # None: the bundled calibration clips
    batch_size: int = 8
    out: str = "runs/mla_conversion"


def _records(out_dir: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out_dir / "utterances.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows if r.get("model") == "model"}


def _paired(variant: dict[str, dict], original: dict[str, dict]) -> dict:
    ids = sorted(set(variant) & set(original))
    b = paired_bootstrap(
        [variant[i]["word_errors"] for i in ids], [original[i]["word_errors"] for i in ids],
        [original[i]["n_words"] for i in ids],
    )
    return b.to_dict()


def _eval(model, processor, samples, out_dir: Path, cfg: BenchConfig) -> dict:
    result = evaluate(model, processor, samples, batch_size=cfg.batch_size, language=cfg.language,
                      out_dir=out_dir, progress=False)
    return {"wer": result.wer, "cer": result.cer, "n_utterances": result.overall.n_utterances,
            "n_words": result.overall.n_words, "wall_seconds": round(result.wall_seconds, 1)}


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    import transformers

    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit}


def main(cfg: BenchConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [s for s in open_dataset(cfg.data) if cfg.language is None or s.language in (cfg.language, None)]
    results: dict = {"config": cfg.__dict__, "environment": environment(), "models": {}}
    for name in cfg.models:
        model, processor = sw.load(name)
        base_dir = out / name / "original"
        rows = {"original": {**_eval(model, processor, samples, base_dir, cfg), "kv_bytes_per_token":
                             sw.kv_cache_bytes(model).self_attention}}
        original = _records(base_dir)
        start = time.perf_counter()
        stats = calibrate_mla(model, cfg.modules, cfg.calibration, progress=False)  # shared by every recipe
        rows["original"]["calibration_seconds"] = round(time.perf_counter() - start, 1)
        for fac in cfg.factorizations:
            for red in cfg.reductions:
                key = f"{fac}-{red}"
                start = time.perf_counter()
                slim = sw.convert(model, sw.MLAConfig(modules=cfg.modules, kv_reduction=red, factorization=fac),
                                  calibration=stats, progress=False)
                convert_s = time.perf_counter() - start
                run_dir = out / name / key
                rows[key] = {**_eval(slim, processor, samples, run_dir, cfg), "convert_seconds": round(convert_s, 1),
                             "kv_bytes_per_token": sw.kv_cache_bytes(slim).self_attention,
                             "delta_wer": _paired(_records(run_dir), original)}
                print(name, key, json.dumps(rows[key]), flush=True)
        results["models"][name] = rows
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = [
        "| model | variant | KV bytes/token (fp16) | WER % | Δ WER vs original (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results["models"].items():
        for key, r in rows.items():
            d = r.get("delta_wer")
            delta = "" if d is None else (
                f"{100 * d['delta']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}] {d['mark']}"
            )
            lines.append(f"| {name} | {key} | {r['kv_bytes_per_token']:,} | {100 * r['wer']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    parser.add_argument("--models", nargs="+", default=d.models)
    parser.add_argument("--reductions", nargs="+", type=float, default=d.reductions)
    parser.add_argument("--factorizations", nargs="+", default=d.factorizations)
    parser.add_argument("--modules", nargs="+", default=list(d.modules))
    parser.add_argument("--data", default=d.data)
    parser.add_argument("--language", default=d.language)
    parser.add_argument("--calibration", default=d.calibration)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--out", default=d.out)
    a = parser.parse_args()
    main(BenchConfig(models=a.models, reductions=a.reductions, factorizations=a.factorizations,
                     modules=tuple(a.modules), data=a.data, language=a.language, calibration=a.calibration,
                     batch_size=a.batch_size, out=a.out))
