"""`slimwhisper demo`: the whole product in one run on bundled data.

Converts tiny.en's decoder self-attention to MLA at 75% KV-cache reduction (activation-aware,
calibrated on the bundled calibration clips), transcribes the bundled demo clips with the original
and the converted model, and prints texts, WER and KV-cache bytes side by side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .assets import demo_clips
from .audio import load_audio
from .eval.metrics import corpus_wer


@dataclass(frozen=True)
class DemoConfig:
    model: str = "tiny.en"
    kv_reduction: float = 0.75
    out: str | None = None  # also save the converted model here


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    from . import MLAConfig, convert, load
    from .decoding import transcribe_arrays
    from .info import describe

    model, processor = load(cfg.model)
    start = time.perf_counter()
    slim = convert(model, MLAConfig(modules=("decoder_self",), kv_reduction=cfg.kv_reduction))
    convert_s = time.perf_counter() - start
    if cfg.out:
        from .cliargs import staged_folder
        from .loading.processor import save_processor

        with staged_folder(Path(cfg.out)) as tmp:
            slim.save_pretrained(tmp)
            save_processor(processor, tmp)
    clips = demo_clips()
    audios = [load_audio(c["audio"]) for c in clips]
    refs = [c["text"] for c in clips]
    original = transcribe_arrays(model, processor, audios)
    converted = transcribe_arrays(slim, processor, audios)
    summary = describe(slim.config)
    result = {
        "model": cfg.model,
        "kv_reduction": cfg.kv_reduction,
        "convert_seconds": round(convert_s, 1),
        "wer": {"original": corpus_wer(refs, original, "en"), "converted": corpus_wer(refs, converted, "en")},
        "kv_bytes_per_token": summary["kv_bytes_per_token"],
        "cross_kv_bytes": summary["cross_kv_bytes"],
        "clips": [
            {"id": c["id"], "reference": r, "original": o, "converted": v}
            for c, r, o, v in zip(clips, refs, original, converted)
        ],
    }
    _print(result)
    return result


def _print(result: dict) -> None:
    pct = int(round(result["kv_reduction"] * 100))
    print(f"\n{result['model']}: original vs MLA decoder self-attention at {pct}% KV reduction")
    print(f"(activation-aware, calibrated on the bundled calibration clips in {result['convert_seconds']} s)\n")
    for clip in result["clips"]:
        print(f"[{clip['id']}]")
        print(f"  reference : {clip['reference']}")
        print(f"  original  : {clip['original']}")
        print(f"  MLA {pct:>3}%  : {clip['converted']}")
    kv, cross, wer = result["kv_bytes_per_token"], result["cross_kv_bytes"], result["wer"]
    print()
    print(f"{'':28}{'original':>12}{'MLA':>12}")
    print(f"{'WER (normalised)':28}{wer['original']:>11.1%}{wer['converted']:>12.1%}")
    print(f"{'self-attn KV bytes / token':28}{kv['original']:>12,}{kv['converted']:>12,}")
    print(f"{'cross-attn KV bytes / clip':28}{cross['original']:>12,}{cross['converted']:>12,}")
    print("(KV bytes: fp16, batch 1, all decoder layers; cross-attention is left unconverted here)")
