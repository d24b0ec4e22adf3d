"""`slimwhisper bench e2e`: end-to-end real-time factor and WER of the engine, `generate` and faster-whisper.

All systems run in one process on the same audio with the same threads; rtf = processing wall time /
audio duration (audio decoding excluded, feature extraction included). faster-whisper reads the same
CTranslate2 weights the model was loaded from (`config.slimwhisper_source`), greedy, no VAD, without
timestamps, one `WhisperModel.transcribe` call per file (its batched pipeline batches windows of one
file only, so for clips under 30 s it is the same).

Systems: "slimwhisper" is the engine as fast as it is offered on the device (int8 linears on a CPU,
like for like with "faster_whisper_int8"); "slimwhisper_fp32" the engine in the model's own precision,
which gives the same tokens as "hf_generate" (transformers `generate`, same precision).
Systems run one after another (not interleaved): on a shared machine compare within one run only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..errors import SlimWhisperError
from .common import run_metadata, set_threads

SYSTEMS = ("slimwhisper", "slimwhisper_fp32", "hf_generate", "faster_whisper_int8", "faster_whisper_fp32")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("e2e", help="end-to-end RTF and WER: engine vs generate vs faster-whisper")
    p.add_argument("--model", required=True, help="tiny.en, base, or a converted model directory")
    p.add_argument("--data", required=True, help="dataset (manifest.jsonl, folder, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--language", help="keep only this language and decode with it (multilingual models)")
    p.add_argument("--limit", type=int, help="first N utterances")
    p.add_argument("--threads", type=int, help="intra-op threads for every system (default torch's)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the result JSON here")
    return p


def _ct2_dir(model) -> Path:
    """A folder faster-whisper can load holding the model's source CTranslate2 weights (parts joined once)."""
    from ..loading.cache import cache_root
    from ..loading.registry import resolve_short_name

    source = getattr(model.config, "slimwhisper_source", None) or {}
    if source.get("format") != "ctranslate2":
        raise SlimWhisperError("the model was not loaded from CTranslate2 files")
    name = source["name"]
    path = Path(name)
    files = resolve_short_name(name) if not path.exists() else None
    if files is None:
        return path
    if len(files.weights) == 1 and files.weights[0].parent == files.directory:
        return files.directory
    target = cache_root() / "ct2-joined" / name
    if not (target / "model.bin").exists():
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / "model.bin.tmp"
        with open(tmp, "wb") as out:
            for part in files.weights:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        for side in files.directory.iterdir():
            if side.is_file() and not side.name.startswith("model.bin"):
                shutil.copy(side, target / side.name)
        tmp.rename(target / "model.bin")
    return target


def _wer(refs: list[str], hyps: list[str], language: str | None) -> float:
    from ..eval.metrics import corpus_rate, word_errors
    from ..eval.normalize import normalize

    errors, n_ref = [], []
    for ref, hyp in zip(refs, hyps):
        counts = word_errors(normalize(ref, language), normalize(hyp, language))
        errors.append(counts.errors)
        n_ref.append(counts.n_ref)
    return corpus_rate(errors, n_ref)


def _faster_whisper(model, audios, language, compute_type: str, threads: int) -> tuple[list[str], float]:
    from faster_whisper import WhisperModel

    fw = WhisperModel(str(_ct2_dir(model)), device="cpu", compute_type=compute_type, cpu_threads=threads)
    fw.transcribe(audios[0], beam_size=1, language=language, without_timestamps=True, vad_filter=False)  # warm-up
    t0 = time.perf_counter()
    texts = []
    for a in audios:
        segments, _ = fw.transcribe(a, beam_size=1, language=language, without_timestamps=True, vad_filter=False,
                                    condition_on_previous_text=False, temperature=0.0)
        texts.append("".join(s.text for s in segments).strip())
    return texts, time.perf_counter() - t0


def _engine(model, processor, audios, language, batch, quantize) -> tuple[list[str], float, dict]:
    from ..engine import Transcriber

    engine = Transcriber(model, processor, batch_size=batch, quantize=quantize)
    engine.transcribe(audios[:1], language=language, temperature=0.0)  # warm-up
    engine.stats = dict.fromkeys(engine.stats, 0)
    t0 = time.perf_counter()
    results = engine.transcribe(audios, language=language, temperature=0.0)
    wall = time.perf_counter() - t0
    stats = dict(engine.stats)
    stats["decode_ms_per_step"] = 1000 * stats["decode_s"] / max(1, stats["steps"])
    return [r.text for r in results], wall, stats


def _generate(model, processor, audios, language, batch) -> tuple[list[str], float]:
    from ..transcribe import transcribe_arrays

    transcribe_arrays(model, processor, audios[:1], language=language, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    texts = transcribe_arrays(model, processor, audios, language=language, batch_size=batch)
    return texts, time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from ..audio import SAMPLE_RATE, load_audio
    from ..data import open_dataset
    from ..loading import load

    threads = set_threads(args.threads)
    samples = list(open_dataset(args.data, keep_language=args.language, limit=args.limit))
    if not samples:
        raise SlimWhisperError(f"no utterances in {args.data}")
    audios = [load_audio(s.audio) for s in samples]
    refs = [s.text for s in samples]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    model, processor = load(args.model)
    model.eval()
    device = next(model.parameters()).device
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    language = args.language or (samples[0].language if multilingual else None)
    rtf: dict = {}
    wer: dict = {}
    extra: dict = {}
    tokenizer = processor.tokenizer
    for system in args.systems:
        stats = None
        try:
            if system.startswith("slimwhisper"):
                # like for like with faster_whisper_int8: the engine's int8 linears on a CPU
                quant = "int8" if system == "slimwhisper" and device.type == "cpu" else None
                texts, wall, stats = _engine(model, processor, audios, language, args.batch, quant)
                stats["quantize"] = quant
            elif system == "hf_generate":
                texts, wall = _generate(model, processor, audios, language, args.batch)
            else:
                compute = {"int8": "int8", "fp32": "float32"}[system.rsplit("_", 1)[1]]
                texts, wall = _faster_whisper(model, audios, language or "en", compute, threads)
        except (ImportError, SlimWhisperError) as exc:
            rtf[system] = wer[system] = None
            extra[system] = {"skipped": str(exc)}
            continue
        n_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
        rtf[system], wer[system] = wall / seconds, _wer(refs, texts, language or "en")
        extra[system] = {"wall_s": wall, "output_tokens": n_tokens, "ms_per_output_token": 1000 * wall / n_tokens}
        if stats:
            extra[system]["engine"] = stats
    result = {
        "rtf": rtf,
        "wer": wer,
        "details": extra,
        "audio_seconds": seconds,
        "utterances": len(samples),
        **run_metadata(model=args.model, data=args.data, batch=args.batch, threads=threads, language=language),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for system in rtf:
            print(f"{system:22s} rtf {rtf[system]}  wer {wer[system]}")
    return 0
