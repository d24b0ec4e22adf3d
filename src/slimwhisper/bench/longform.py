"""`slimwhisper bench e2e --long-form`: one long recording through every long-form decoder, in one run.

The dataset's utterances are joined, in order, into one recording with `--pause` seconds of silence
between them (recordings of minutes, with the references joined the same way), as a meeting or a
lecture would be. Every system then transcribes that one recording, language detected unless given:

- "slimwhisper": the engine's batched mode (speech packed into windows at silences), int8 linears on a CPU;
- "slimwhisper_fp32": the same in the model's precision;
- "slimwhisper_sequential" / "slimwhisper_sequential_fp32": the engine's sequential mode (openai-whisper's
  and transformers' algorithm: windows seek by timestamps);
- "hf_generate": transformers' long-form `generate` (sequential, timestamps), model precision;
- "faster_whisper_int8": faster-whisper's sequential `transcribe`, greedy, its default options;
- "faster_whisper_batched_int8": faster-whisper's `BatchedInferencePipeline` (its VAD, batch `--batch`).

rtf = wall time / audio duration (feature extraction and voice activity detection included); each system
runs once after a warm-up on the first utterance. `details[system]` holds the engine's work counters
(windows decoded, temperature retries, silent windows, windows decoded again or continued).
"""
from __future__ import annotations

import time

import numpy as np

from ..audio import SAMPLE_RATE, load_audio
from ..errors import SlimWhisperError
from ..eval.metrics import corpus_wer

SYSTEMS = ("slimwhisper", "slimwhisper_fp32", "slimwhisper_sequential", "slimwhisper_sequential_fp32",
           "hf_generate", "faster_whisper_int8", "faster_whisper_batched_int8")


def join_recordings(audios: list[np.ndarray], texts: list[str], pause_s: float) -> tuple[np.ndarray, str]:
    """One recording of `audios` separated by `pause_s` of silence, and its reference (texts joined by spaces)."""
    gap = np.zeros(round(pause_s * SAMPLE_RATE), dtype=np.float32)
    pieces = [p for a in audios for p in (a, gap)][:-1]
    return np.concatenate(pieces).astype(np.float32), " ".join(t.strip() for t in texts)


def _engine(model, processor, audio, language, batch, quantize, mode) -> tuple[str, float, dict]:
    from ..engine import Transcriber

    engine = Transcriber(model, processor, batch_size=batch, quantize=quantize)
    engine.transcribe(audio[: 10 * SAMPLE_RATE], language=language, mode=mode)  # warm-up
    engine.stats = engine.new_stats()
    t0 = time.perf_counter()
    text = engine.transcribe(audio, language=language, mode=mode).text
    return text, time.perf_counter() - t0, dict(engine.stats)


def _generate(model, processor, audio, language) -> tuple[str, float]:
    from ..decoding import generate_texts, generation_kwargs

    kwargs = generation_kwargs(model, language, 1)
    generate_texts(model, processor, [audio[: 40 * SAMPLE_RATE]], long_form=True, **kwargs)  # warm-up
    t0 = time.perf_counter()
    text = generate_texts(model, processor, [audio], long_form=True, **kwargs)[0]
    return text, time.perf_counter() - t0


def _faster_whisper(model, audio, language, batched: bool, batch: int, threads: int) -> tuple[str, float]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from .e2e import _ct2_dir

    fw = WhisperModel(str(_ct2_dir(model)), device="cpu", compute_type="int8", cpu_threads=threads)
    run = BatchedInferencePipeline(fw).transcribe if batched else fw.transcribe
    extra = {"batch_size": batch} if batched else {}
    list(run(audio[: 10 * SAMPLE_RATE], beam_size=1, language=language, **extra)[0])  # warm-up
    t0 = time.perf_counter()
    segments, _ = run(audio, beam_size=1, language=language, **extra)
    text = "".join(s.text for s in segments).strip()  # segments are lazy: decoding happens here
    return text, time.perf_counter() - t0


def run_system(system: str, model, processor, audio, language, batch: int, threads: int) -> tuple[str, float, dict]:
    """(text, wall seconds, engine counters) of one system on the long recording."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if system.startswith("slimwhisper"):
        quantize = "int8" if on_cpu and not system.endswith("fp32") else None
        mode = "sequential" if "sequential" in system else "batched"
        return _engine(model, processor, audio, language, batch, quantize, mode)
    if system == "hf_generate":
        return (*_generate(model, processor, audio, language), {})
    return (*_faster_whisper(model, audio, language, "batched" in system, batch, threads), {})


def run_long_form(model, processor, samples, args, threads: int) -> dict:
    """The long-form result: rtf, wer and details per system, and the joined recording's length."""
    audio, reference = join_recordings([load_audio(s.audio) for s in samples], [s.text for s in samples],
                                       args.pause)
    languages = {s.language for s in samples}
    score_language = languages.pop() if len(languages) == 1 else None
    rtf, wer, details = {}, {}, {}
    seconds = len(audio) / SAMPLE_RATE
    for system in args.systems:
        if system not in SYSTEMS:
            raise SlimWhisperError(f"{system} has no long-form run; choose from {', '.join(SYSTEMS)}")
        try:
            text, wall, stats = run_system(system, model, processor, audio, args.language, args.batch_size, threads)
        except (ImportError, SlimWhisperError) as exc:
            rtf[system] = wer[system] = None
            details[system] = {"skipped": str(exc)}
            continue
        rtf[system], wer[system] = wall / seconds, corpus_wer([reference], [text], score_language)
        details[system] = {"wall_s": wall, "engine": stats} if stats else {"wall_s": wall}
    return {"rtf": rtf, "wer": wer, "details": details, "audio_seconds": seconds, "utterances": len(samples),
            "pause_s": args.pause}
