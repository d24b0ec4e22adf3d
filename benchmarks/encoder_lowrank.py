"""Low-rank encoder (LiteASR-style PCA) without fine-tuning: encoder size, latency and WER per preset.

For each model: calibrate the original encoder once (statistics reused by every recipe and saved as
OUT/MODEL/encoder_stats.safetensors), then for each energy mode and preset convert, count encoder
parameters, time the encoder on one 30-s input (2 threads, median of --repeats after a warm-up)
against the original in the same run, and optionally evaluate WER. Results: OUT/results.json/.md.

    python benchmarks/encoder_lowrank.py --models tiny.en base --energies linear squared \
        --data ../shared/data/realspeech/manifest.jsonl --language en --out runs/encoder_lowrank
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimwhisper as sw
from slimwhisper.lowrank import STATS_FILE, EncoderStats, LowRankConfig, calibrate


def encoder_params(model) -> int:
    return sum(p.numel() for p in model.get_encoder().parameters())


@torch.no_grad()
def encoder_latency(model, repeats: int) -> float:
    """Median seconds of one encoder pass over a 30-s input (batch 1)."""
    x = torch.randn(1, model.config.num_mel_bins, 3000, dtype=next(model.parameters()).dtype)
    encoder = model.get_encoder().eval()
    encoder(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eval(model, processor, samples, out_dir: Path, language: str | None) -> dict:
    from slimwhisper.eval import evaluate

    result = evaluate(model, processor, samples, batch_size=8, language=language, out_dir=out_dir, progress=False)
    return {"wer": result.wer, "n_utterances": result.overall.n_utterances, "n_words": result.overall.n_words}


def main(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"models": {}}
    results["settings"] = {"threads": a.threads, "repeats": a.repeats, "calibration": a.calibration or "bundled",
                           "calibration_limit": a.calibration_limit, "granule": a.granule, "torch": torch.__version__}
    samples = None
    if a.data:
        from slimwhisper.data import open_dataset

        samples = [s for s in open_dataset(a.data) if a.language is None or s.language in (a.language, None)]
    for name in a.models:
        model, processor = sw.load(name)
        model.eval()
        stats_path = out / name / STATS_FILE
        start = time.perf_counter()
        if stats_path.is_file():
            stats = EncoderStats.load(stats_path)
        else:
            stats = calibrate(model, a.calibration, limit=a.calibration_limit, progress=True)
            stats.save(stats_path)
        calib_s = time.perf_counter() - start
        rows = results["models"].setdefault(name, {})
        orig_params = encoder_params(model)
        variants = {}
        for energy in a.energies:
            for preset in a.presets:
                cfg = LowRankConfig(preset=preset, energy=energy, granule=a.granule)
                variants[f"{energy}-{preset}"] = sw.convert(model, cfg, calibration=stats, progress=False)
        # latencies in one run, interleaved rounds so drift hits every variant alike
        lat: dict[str, list[float]] = {k: [] for k in ["original", *variants]}
        for _ in range(a.rounds):
            lat["original"].append(encoder_latency(model, a.repeats))
            for key, slim in variants.items():
                lat[key].append(encoder_latency(slim, a.repeats))
        base = statistics.median(lat["original"])
        rows["original"] = {**rows.get("original", {}), "encoder_params": orig_params, "latency_s": base,
                            "calibration_seconds": round(calib_s, 1), "calibration_windows": stats.windows}
        if samples is not None and a.wer_original and "wer" not in rows["original"]:
            rows["original"].update(_eval(model, processor, samples, out / name / "original", a.language))
        for key, slim in variants.items():
            lowrank = slim.config.compression["lowrank"]
            row = {**rows.get(key, {}),
                   "thetas": [lowrank["recipe"]["theta_attn"], lowrank["recipe"]["theta_mlp"]],
                   "encoder_params": encoder_params(slim),
                   "encoder_param_ratio": encoder_params(slim) / orig_params,
                   "compressed_linears": len(lowrank["layers"]),
                   "latency_s": statistics.median(lat[key]),
                   "latency_ratio": statistics.median(lat[key]) / base}
            if samples is not None and key in a.wer_for and "wer" not in row:
                row.update(_eval(slim, processor, samples, out / name / key, a.language))
            if a.save:
                slim.save_pretrained(out / name / key / "model")
                from slimwhisper.loading.processor import save_processor

                save_processor(processor, out / name / key / "model")
            rows[key] = row
            print(name, key, json.dumps(row), flush=True)
        results_file.write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "encoder_latency_vs_size.png")
    print(markdown(results))
    return results


def plot(results: dict, path: Path) -> Path:
    """Encoder latency ratio against encoder parameter ratio, one marker per variant, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rows in results["models"].items():
        pts = [(r.get("encoder_param_ratio", 1.0), r.get("latency_ratio", 1.0), key) for key, r in rows.items()]
        line = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name)
        colour = line.get_facecolor()[0]
        for x, y, key in pts:
            ax.annotate(key, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3), color=colour)
    ax.plot([0.5, 1.0], [0.5, 1.0], ls=":", color="grey", label="latency = size")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("encoder parameters (ratio to original)")
    ax.set_ylabel("encoder latency, 30-s input (ratio to original, same run)")
    threads = results.get("settings", {}).get("threads")
    ax.set_title(f"Low-rank encoder: latency vs size ({threads} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    lines = ["| model | variant | thetas (attn:mlp) | encoder params | ratio | latency ms | latency ratio | WER % |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for key, r in rows.items():
            thetas = ":".join(map(str, r.get("thetas", []))) or "-"
            wer = f"{100 * r['wer']:.2f}" if "wer" in r else "-"
            ratio = r.get("encoder_param_ratio", 1)
            lines.append(f"| {name} | {key} | {thetas} | {r['encoder_params']:,} | {ratio:.3f} "
                         f"| {1000 * r['latency_s']:.0f} | {r.get('latency_ratio', 1):.3f} | {wer} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    p.add_argument("--presets", nargs="+", default=["a", "b", "c"])
    p.add_argument("--energies", nargs="+", default=["linear"])
    p.add_argument("--granule", type=int, default=16)
    p.add_argument("--calibration", default=None, help="calibration audio (default: bundled clips)")
    p.add_argument("--calibration-limit", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--data", default=None, help="evaluation manifest (omit to skip WER)")
    p.add_argument("--language", default="en")
    p.add_argument("--wer-for", nargs="*", default=[], help="variants to evaluate, e.g. linear-b squared-b")
    p.add_argument("--wer-original", action="store_true", help="also evaluate the original")
    p.add_argument("--save", action="store_true", help="save every variant under OUT/MODEL/VARIANT/model")
    p.add_argument("--out", default="runs/encoder_lowrank")
    p.add_argument("--render", help="only rebuild results.md and the plot from this results.json")
    args = p.parse_args()
    if args.render:
        rendered = json.loads(Path(args.render).read_text())
        Path(args.render).with_name("results.md").write_text(markdown(rendered))
        print(plot(rendered, Path(args.render).with_name("encoder_latency_vs_size.png")))
    else:
        main(args)
