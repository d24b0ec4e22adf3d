"""Recovery fine-tuning: WER before / after fine-tuning and of the identically trained control.

For each model and cell (MLA: converted modules and KV-cache reduction; low-rank encoder: energy mode and
preset), convert (activation-aware, bundled calibration clips), fine-tune on the training set, and
evaluate the converted model before and after fine-tuning and the control (the original trained
identically) on each test set, with the paired bootstrap of model vs control. Cells with the same
converted module paths share one control (same paths, data order, seed and teacher: the control would
be bit-identical). Low-rank cells train the low-rank factors (`--lowrank-finetune`, default scope
"converted"): the decoder-scope default would leave the compressed encoder untouched.
Results go to OUT/results.json after every cell (finished cells are skipped on a re-run) and OUT/results.md.

    python benchmarks/recovery.py --models tiny.en --out runs/recovery
    python benchmarks/recovery.py --models tiny.en --reductions --cross-reduction -1 \
        --lowrank squared-a linear-b --out runs/recovery-lowrank
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import slimwhisper as sw
from slimwhisper.data import open_dataset
from slimwhisper.eval import evaluate, paired_bootstrap
from slimwhisper.info import describe
from slimwhisper.loading.processor import save_processor
from slimwhisper.recovery import FinetuneConfig, RecoveryJob, recover
from slimwhisper.recovery.data import SkipReport, hash_samples
from slimwhisper.recovery.pipeline import _environment as environment
from slimwhisper.recovery.train import converted_paths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["tiny.en", "base"])
    reductions: list[float] = field(default_factory=lambda: [0.875, 0.75, 0.625])  # the target cell first
    cross_reduction: float | None = 0.75  # one extra cell converting decoder self- and cross-attention
    train: str = str(SHARED / "synth-en-train" / "manifest.jsonl")
    tests: dict[str, str] = field(default_factory=lambda: {
        "realspeech-en": str(SHARED / "realspeech" / "manifest.jsonl"),
        "synth-en-test": str(SHARED / "synth-en-test" / "manifest.jsonl")})
    finetune: dict = field(default_factory=dict)  # FinetuneConfig overrides (default: the documented recipe)
    lowrank: list[str] = field(default_factory=list)  # low-rank encoder cells, "ENERGY-PRESET", e.g. squared-a
    lowrank_finetune: dict = field(default_factory=lambda: {"scope": "converted", "lr": 1e-4})
    batch_size: int = 8
    out: str = "runs/recovery"


def _records(out_dir: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out_dir / "utterances.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows if r.get("model") == "model"}


def _paired(a_dir: Path, b_dir: Path) -> dict:
    """Paired bootstrap of corpus WER, a minus b, on the utterances both scored."""
    a, b = _records(a_dir), _records(b_dir)
    ids = sorted(set(a) & set(b))
    boot = paired_bootstrap([a[i]["word_errors"] for i in ids], [b[i]["word_errors"] for i in ids],
                            [b[i]["n_words"] for i in ids])
    return boot.to_dict()


def _eval(model_dir: str | Path, tests: dict, out_dir: Path, batch_size: int) -> dict:
    """WER of one saved model on every test set (English decoding), resumable per utterance."""
    model, processor = sw.load(model_dir)
    rows = {}
    for name, path in tests.items():
        samples = [s for s in open_dataset(path) if s.language in ("en", None)]
        r = evaluate(model, processor, samples, batch_size=batch_size, language="en", out_dir=out_dir / name,
                     progress=False)
        rows[name] = {"wer": r.wer, "n_words": r.overall.n_words, "wall_seconds": round(r.wall_seconds, 1)}
    return rows


def _check_disjoint(train: str, tests: dict) -> None:
    """Evaluation audio must never be trained on: compare decoded-audio hashes."""
    seen = {h for _, h in hash_samples(open_dataset(train), SkipReport())}
    for name, path in tests.items():
        overlap = [s.id for s, h in hash_samples(open_dataset(path), SkipReport()) if h in seen]
        if overlap:
            raise SystemExit(f"{name} shares {len(overlap)} clips with the training set, e.g. {overlap[:3]}")


@dataclass(frozen=True)
class Cell:
    """One compression recipe to recover: an MLA conversion or a low-rank encoder preset."""

    key: str
    modules: tuple[str, ...]
    kv_reduction: float = 0.0
    lowrank: str | None = None  # "ENERGY-PRESET"

    def build(self, model):
        if self.lowrank is None:
            return sw.convert(model, sw.MLAConfig(modules=self.modules, kv_reduction=self.kv_reduction),
                              progress=False)
        from slimwhisper.lowrank import LowRankConfig, convert_lowrank

        energy, preset = self.lowrank.split("-")
        return convert_lowrank(model, LowRankConfig(preset=preset, energy=energy), progress=False)


def cells_of(cfg: BenchConfig) -> list[Cell]:
    cells = [Cell(f"decoder_self-{r}", ("decoder_self",), r) for r in cfg.reductions]
    if cfg.cross_reduction is not None:
        cells.append(Cell(f"decoder_self+decoder_cross-{cfg.cross_reduction}", ("decoder_self", "decoder_cross"),
                          cfg.cross_reduction))
    cells += [Cell(f"encoder_lowrank-{v}", ("encoder_lowrank",), lowrank=v) for v in cfg.lowrank]
    return cells


def run_cell(name: str, cell_spec: Cell, controls: dict, cfg: BenchConfig) -> dict:
    """Convert (once), fine-tune (reusing a control trained on the same module paths and recipe), evaluate."""
    cell = out_root(cfg) / name / cell_spec.key
    converted = cell / "converted"
    row: dict = {"modules": list(cell_spec.modules), "kv_reduction": cell_spec.kv_reduction,
                 "lowrank": cell_spec.lowrank}
    if not (converted / "config.json").is_file():
        model, processor = sw.load(name)
        t0 = time.perf_counter()
        slim = cell_spec.build(model)
        row["convert_seconds"] = round(time.perf_counter() - t0, 1)
        slim.save_pretrained(converted)
        save_processor(processor, converted)
    overrides = cfg.finetune if cell_spec.lowrank is None else {**cfg.finetune, **cfg.lowrank_finetune}
    row["finetune"] = overrides
    row["converted_paths"] = list(_paths(converted))
    if cell_spec.lowrank is not None:
        row["encoder_params"] = _encoder_params(converted)
    control_dir = controls.get(_control_key(row))
    t0 = time.perf_counter()
    record = recover(RecoveryJob(model=str(converted), train=cfg.train, out=str(cell / "ft"),
                                 config=FinetuneConfig(**overrides), control=control_dir is None, progress=False))
    row["finetune_seconds"] = {arm: round(r["wall_seconds"], 1) for arm, r in record["arms"].items()}
    row["finetune_call_seconds"] = round(time.perf_counter() - t0, 1)
    row["last_loss"] = {arm: r["last"] for arm, r in record["arms"].items()}
    control = control_dir or cell / "ft" / "control"
    row["control_dir"] = str(control)
    evals = {"before": converted, "after": cell / "ft" / "model", "control": control}
    row["wer"] = {}
    for tag, path in evals.items():
        eval_dir = (Path(str(control)).parent.parent / "eval-control") if tag == "control" else cell / f"eval-{tag}"
        row["wer"][tag] = _eval(path, cfg.tests, eval_dir, cfg.batch_size)
        evals[tag] = eval_dir
    original_eval = out_root(cfg) / name / "eval-original"
    row["delta"] = {}
    for test in cfg.tests:
        row["delta"][test] = {
            "after_vs_control": _paired(evals["after"] / test, evals["control"] / test),
            "before_vs_control": _paired(evals["before"] / test, evals["control"] / test),
            "control_vs_original": _paired(evals["control"] / test, original_eval / test),
        }
    return row


def _encoder_params(model_dir: Path) -> dict:
    return describe(sw.load(model_dir)[0].config)["encoder_params"]


def _paths(model_dir: Path) -> tuple[str, ...]:
    """Converted module paths recorded in a saved model's config.json."""
    return converted_paths(SimpleNamespace(**json.loads((model_dir / "config.json").read_text())))


def out_root(cfg: BenchConfig) -> Path:
    return Path(cfg.out)


def main(cfg: BenchConfig) -> dict:
    out = out_root(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _check_disjoint(cfg.train, cfg.tests)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(config=asdict(cfg), recipe=FinetuneConfig(**cfg.finetune).to_dict(), environment=environment())
    results.setdefault("models", {})
    for name in cfg.models:
        rows = results["models"].setdefault(name, {})
        if "original" not in rows:
            t0 = time.perf_counter()
            rows["original"] = {"wer": _eval(name, cfg.tests, out / name / "eval-original", cfg.batch_size),
                                "eval_seconds": round(time.perf_counter() - t0, 1)}
            path.write_text(json.dumps(results, indent=2))
        controls: dict[tuple, Path] = {}  # one control per (converted module paths, recipe)
        for cell in cells_of(cfg):
            if cell.key in rows and "delta" in rows[cell.key]:
                controls.setdefault(_control_key(rows[cell.key]), Path(rows[cell.key]["control_dir"]))
                continue
            rows[cell.key] = run_cell(name, cell, controls, cfg)
            controls.setdefault(_control_key(rows[cell.key]), Path(rows[cell.key]["control_dir"]))
            key = cell.key
            print(name, key, json.dumps(rows[key]["wer"]), flush=True)
            path.write_text(json.dumps(results, indent=2))
            (out / "results.md").write_text(markdown(results))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def _control_key(row: dict) -> tuple:
    return tuple(row.get("converted_paths", row["modules"])), json.dumps(row.get("finetune", {}), sort_keys=True)


def _d(d: dict) -> str:
    return f"{100 * d['delta']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}] {d['mark']}"


def markdown(results: dict) -> str:
    tests = list(results["config"]["tests"])
    head = "| model | modules | KV red. / preset | " + " | ".join(
        f"{t} WER % before / after / control | {t} Δ after−control (95% CI)" for t in tests)
    head += " | train s (model, control) |"
    lines = [head, "|" + "---|" * (3 + 2 * len(tests) + 1)]
    for name, rows in results["models"].items():
        orig = rows.get("original", {}).get("wer", {})
        lines.append(f"| {name} | original | 0 | " + " | ".join(
            f"{100 * orig[t]['wer']:.2f} | " if t in orig else " | " for t in tests) + " |")
        for key, r in rows.items():
            if key == "original" or "delta" not in r:
                continue
            cells = []
            for t in tests:
                w = {k: 100 * r["wer"][k][t]["wer"] for k in ("before", "after", "control")}
                cells.append(f"{w['before']:.2f} / {w['after']:.2f} / {w['control']:.2f}")
                cells.append(_d(r["delta"][t]["after_vs_control"]))
            secs = r.get("finetune_seconds", {})
            what = r.get("lowrank") or r["kv_reduction"]
            lines.append(f"| {name} | {'+'.join(r['modules'])} | {what} | " + " | ".join(cells)
                         + f" | {secs.get('model', '')}, {secs.get('control', 'shared')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    parser.add_argument("--models", nargs="+", default=d.models)
    parser.add_argument("--reductions", nargs="*", type=float, default=d.reductions)
    parser.add_argument("--cross-reduction", type=float, default=d.cross_reduction, help="negative: no cross cell")
    parser.add_argument("--train", default=d.train)
    parser.add_argument("--finetune", default="{}", help='FinetuneConfig overrides as JSON, e.g. \'{"steps": 100}\'')
    parser.add_argument("--lowrank", nargs="*", default=[], help="low-rank encoder cells, e.g. squared-a linear-b")
    parser.add_argument("--lowrank-finetune", default=json.dumps(d.lowrank_finetune),
                        help="FinetuneConfig overrides for low-rank cells (applied over --finetune)")
    parser.add_argument("--tests", nargs="+", default=list(d.tests), help=f"subset of {', '.join(d.tests)}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--out", default=d.out)
    a = parser.parse_args()
    main(BenchConfig(models=a.models, reductions=a.reductions, train=a.train, finetune=json.loads(a.finetune),
                     lowrank=a.lowrank, lowrank_finetune=json.loads(a.lowrank_finetune),
                     cross_reduction=None if a.cross_reduction is not None and a.cross_reduction < 0
                     else a.cross_reduction, batch_size=a.batch_size, out=a.out,
                     tests={t: d.tests[t] for t in a.tests}))
