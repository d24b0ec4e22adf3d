"""WER against self-attention KV-cache bytes per token: what each MLA variant costs and saves (Pareto plot).

Reads the JSON that `benchmarks/mla_conversion.py` (no fine-tuning) and `benchmarks/recovery.py` (after
recovery fine-tuning, with the paired control) write, and draws one panel per model: every variant as a
point, the Pareto front (no other point is both smaller and more accurate) as a line.

    python benchmarks/pareto.py --conversion runs/mla_conversion/results.json runs/mla_conv_d01/results.json \
        --recovery runs/recovery-decoder/results.json --out runs/pareto
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TEST_SET = "realspeech-en"


def conversion_points(results: dict) -> dict[str, list[tuple[str, int, float]]]:
    """Per model: (label, self-attention KV bytes/token, WER) of every variant without fine-tuning."""
    points: dict[str, list[tuple[str, int, float]]] = {}
    for model, rows in results["models"].items():
        for key, row in rows.items():
            label = "original" if key == "original" else f"{key.rsplit('-', 1)[0]}, no fine-tuning"
            points.setdefault(model, []).append((label, int(row["kv_bytes_per_token"]), float(row["wer"])))
    return points


def recovery_points(results: dict, original_bytes: dict[str, int]) -> dict[str, list[tuple[str, int, float]]]:
    """Per model: (label, bytes, WER) after recovery fine-tuning, and of the control (at the original's bytes)."""
    points: dict[str, list[tuple[str, int, float]]] = {}
    for model, cells in results["models"].items():
        full = original_bytes.get(model)
        for key, cell in cells.items():
            if key == "original" or "after" not in cell.get("wer", {}) or full is None:
                continue
            if cell["modules"] != ["decoder_self"]:
                continue  # the self-attention axis only
            nbytes = round(full * (1 - cell["kv_reduction"]))
            points.setdefault(model, []).append(("fine-tuned", nbytes, cell["wer"]["after"][TEST_SET]["wer"]))
            control = cell["wer"].get("control", {}).get(TEST_SET)
            entry = ("control (original, same training)", full, control["wer"]) if control else None
            if entry and entry not in points[model]:  # cells training the same parameters share one control
                points[model].append(entry)
    return points


def pareto_front(points: list[tuple[str, int, float]]) -> list[tuple[int, float]]:
    """The points no other point beats on both axes, by increasing bytes."""
    front: list[tuple[int, float]] = []
    for _, nbytes, wer in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or wer < front[-1][1]:
            front.append((nbytes, wer))
    return front


def plot(points: dict[str, list[tuple[str, int, float]]], path: Path, wer_cap: float = 0.3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
    for ax, (model, pts) in zip(axes[0], points.items()):
        for label in sorted({p[0] for p in pts}):
            xs = [p[1] for p in pts if p[0] == label]
            ys = [min(100 * p[2], 100 * wer_cap) for p in pts if p[0] == label]
            ax.scatter(xs, ys, label=label, s=40)
        front = pareto_front(pts)
        ax.plot([f[0] for f in front], [min(100 * f[1], 100 * wer_cap) for f in front], "k--", lw=1, label="Pareto")
        ax.set(title=model, xlabel="decoder self-attention KV bytes per token (fp16)", ylabel=f"WER % ({TEST_SET})")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"WER vs KV cache (WER capped at {100 * wer_cap:.0f}% for display)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversion", nargs="+", required=True,
                        help="results.json of benchmarks/mla_conversion.py (a later file replaces equal variants)")
    parser.add_argument("--recovery", nargs="*", default=[], help="results.json of benchmarks/recovery.py")
    parser.add_argument("--out", default="runs/pareto")
    args = parser.parse_args()
    merged: dict[str, dict[tuple[str, int], float]] = {}
    for path in args.conversion:
        for model, pts in conversion_points(json.loads(Path(path).read_text())).items():
            merged.setdefault(model, {}).update({(label, nbytes): wer for label, nbytes, wer in pts})
    points = {m: [(label, nbytes, wer) for (label, nbytes), wer in d.items()] for m, d in merged.items()}
    originals = {m: next(b for label, b, _ in pts if label == "original") for m, pts in points.items()}
    for path in args.recovery:
        for model, extra in recovery_points(json.loads(Path(path).read_text()), originals).items():
            points.setdefault(model, []).extend(extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, out / "wer_vs_kv_bytes.png")
    lines = ["| model | variant | self-attn KV bytes/token | WER % |", "|---|---|---|---|"]
    for model, pts in points.items():
        rows = sorted(pts, key=lambda p: -p[1])
        lines += [f"| {model} | {label} | {nbytes:,} | {100 * wer:.2f} |" for label, nbytes, wer in rows]
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {out / 'wer_vs_kv_bytes.png'}")


if __name__ == "__main__":
    main()
