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

Opt-in (not in the default `--systems`, because it pays a compile of minutes before the timed pass):
"slimwhisper_compiled" is "slimwhisper_fp32" built with `compile=True`, which `torch.compile`s the
encoder only (the engine refuses compile with int8: measured no faster, and it moved WER). Before the
timed pass it is warmed up on one file (as every engine system is) and its encoder on every batch size
the timed pass will meet (dynamo recompiles per new shape); that warm-up wall is
`details[...]["compile_s"]`, outside rtf. `graphs_compiled_while_timed` counts dynamo graphs compiled
during the timed pass (0 = no compile leaked into rtf), `graph_breaks` those of the warm-up.

`per_token` isolates the decoder: every 30-s window is encoded once (model precision), then each torch
system decodes the same encoder outputs in the same batches, greedy, without timestamps or fallback,
in interleaved rounds (A B B A, 4 by default: `--per-token-rounds`); ms_per_token = the fastest
round's decode wall time / tokens generated (EOT included), at the run's batch over all windows and
at batch 1 over the first 16. This is where `generate`'s per-step overhead shows, which end-to-end
figures dilute with feature extraction and the encoder.
"slimwhisper_compiled" has no per-token figure: its decoder is "slimwhisper_fp32"'s (only the encoder is compiled).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..cliargs import add_batch_size, add_model
from ..errors import SlimWhisperError
from ..eval.metrics import corpus_wer
from .common import add_result_args, run_metadata, set_threads, write_result
from .longform import SYSTEMS as LONG_FORM_SYSTEMS

SYSTEMS = ("slimwhisper", "slimwhisper_fp32", "hf_generate", "faster_whisper_int8", "faster_whisper_fp32")
OPT_IN_SYSTEMS = ("slimwhisper_compiled",)  # accepted by --systems, never run by default (minutes of compile)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("e2e", help="end-to-end RTF and WER: engine vs generate vs faster-whisper")
    add_model(p)
    p.add_argument("--data", required=True, help="dataset (manifest.jsonl, folder, ...)")
    add_batch_size(p, 8, "30-s windows decoded together")
    p.add_argument("--language", help="keep only this language and decode with it (multilingual models)")
    p.add_argument("--limit", type=int, help="first N utterances")
    p.add_argument("--threads", type=int, help="intra-op threads for every system (default torch's)")
    p.add_argument("--systems", nargs="+", choices=tuple(dict.fromkeys(SYSTEMS + OPT_IN_SYSTEMS + LONG_FORM_SYSTEMS)),
                   help=f"default: {' '.join(SYSTEMS)}; opt-in: {' '.join(OPT_IN_SYSTEMS)} (torch.compile'd encoder); "
                   f"with --long-form: {' '.join(LONG_FORM_SYSTEMS)}")
    p.add_argument("--long-form", action="store_true",
                   help="join the utterances into one long recording and run every long-form decoder on it")
    p.add_argument("--pause", type=float, default=0.6, help="seconds of silence between joined utterances")
    p.add_argument("--languages", help="keep only utterances in these languages (comma-separated), and let every "
                   "system detect the language (--language forces one)")
    p.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                   help="decoder cache of the \"slimwhisper\" system (the engine as offered): float (default) or int8")
    p.add_argument("--no-per-token", action="store_true", help="skip the decoder-only per-token comparison")
    p.add_argument("--per-token-rounds", type=int, default=4,
                   help="interleaved rounds of the per-token comparison (the fastest counts: more rounds, "
                   "steadier figures on a busy machine)")
    p.add_argument("--per-token-windows", type=int, default=16,
                   help="windows decoded one at a time for the batch-1 per-token figure (default 16)")
    add_result_args(p)
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


def _batch_sizes(audios, batch: int) -> list[int]:
    """The encoder batch sizes the engine's batched mode meets on `audios`, in order of first use."""
    from ..audio import split_windows

    n = sum(len(split_windows(a)) for a in audios)
    return list(dict.fromkeys(min(batch, n - start) for start in range(0, n, batch)))


def _dynamo_counts() -> tuple[int, int]:
    """Graphs dynamo has compiled and graph breaks it has hit in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _engine(model, processor, audios, language, batch, quantize, compile: bool = False, kv_cache: str = "float"
            ) -> tuple[list[str], float, dict]:
    """Engine texts and timed wall; the untimed warm-up (with `compile`, every encoder shape) is `warmup_s`."""
    import torch

    from ..engine import Transcriber

    engine = Transcriber(model, processor, batch_size=batch, quantize=quantize, compile=compile, kv_cache=kv_cache)
    breaks_before = _dynamo_counts()[1] if compile else 0
    t0 = time.perf_counter()  # torch.compile is lazy: compiling happens in the first calls below
    engine.transcribe(audios[:1], language=language, temperature=0.0)  # warm-up
    if compile:  # compile the encoder for every batch shape of the timed pass, so no compile lands in rtf
        with torch.inference_mode():
            for size in _batch_sizes(audios, batch):
                engine.runner.encode(engine.features(audios[:1] * size))
    warmup = time.perf_counter() - t0
    engine.stats = dict.fromkeys(engine.stats, 0)
    graphs, breaks = _dynamo_counts() if compile else (0, 0)
    t0 = time.perf_counter()
    results = engine.transcribe(audios, language=language, temperature=0.0)
    wall = time.perf_counter() - t0
    stats = dict(engine.stats)
    stats["decode_ms_per_step"] = 1000 * stats["decode_s"] / max(1, stats["steps"])
    stats["warmup_s"] = warmup
    if compile:
        stats["graphs_compiled_while_timed"] = _dynamo_counts()[0] - graphs
        stats["graph_breaks"] = breaks - breaks_before
    return [r.text for r in results], wall, stats


def _generate(model, processor, audios, language, batch) -> tuple[list[str], float]:
    from ..decoding import transcribe_arrays

    transcribe_arrays(model, processor, audios[:1], language=language, batch_size=batch, engine="generate")  # warm-up
    t0 = time.perf_counter()
    texts = transcribe_arrays(model, processor, audios, language=language, batch_size=batch, engine="generate")
    return texts, time.perf_counter() - t0


def _first_eot_lengths(seqs, start: int, eot: int) -> list[int]:
    """Tokens each row generated after the prompt, counting its EOT (which `generate` may strip from the longest)."""
    return [row.index(eot) + 1 if eot in row else len(row) + 1 for row in seqs[:, start:].tolist()]


def _prompt_length(seqs, prompt: list[int]) -> int:
    """How many leading positions of `generate`'s output are the decoder prompt (0 if it is left out)."""
    head = seqs[0, : len(prompt)].tolist()
    return len(prompt) if head == prompt else 0


def per_token(model, processor, audios, language: str | None, batch: int, systems, rounds: int = 4,
              max_windows: int | None = None) -> dict:
    """Decoder-only ms per generated token of the engine (fp32, int8) and `generate` on shared encoder outputs.

    Uses the first `max_windows` 30-s windows (all by default) in batches of `batch`.
    """
    import torch

    from ..audio import split_windows
    from ..engine import Transcriber

    engine = Transcriber(model, processor, batch_size=batch)
    windows = [w for a in audios for w in split_windows(a)][:max_windows]
    with torch.inference_mode():
        encoded = [engine.runner.encode(engine.features(windows[i : i + batch]))
                   for i in range(0, len(windows), batch)]
    lang_id = engine.language_id(language) if (language and engine.multilingual) else None
    prompt = engine.sot_sequence(lang_id, "transcribe", False)
    passes = _decoder_passes(model, processor, engine, prompt, language, batch, systems)
    times, tokens = _timed_rounds(passes, encoded, rounds)
    ms = {name: 1000 * min(ts) / tokens[name] for name, ts in times.items()}
    result = {"ms_per_token": ms, "tokens": tokens, "windows": len(windows), "batch": batch, "rounds": rounds,
              "decode_s": {name: min(ts) for name, ts in times.items()},
              "rounds_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()}}
    if "hf_generate" in ms:
        result["speedup_vs_hf_generate"] = {n: ms["hf_generate"] / v for n, v in ms.items() if n != "hf_generate"}
    return result


def _decoder_passes(model, processor, engine, prompt: list[int], language: str | None, batch: int,
                    systems) -> dict[str, Callable[[list], int]]:
    """One decode pass per torch system in `systems`: it greedy-decodes a list of encoder-output batches and
    returns the tokens generated (EOT counted)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from ..decoding import generation_kwargs
    from ..engine import Transcriber
    from ..engine.decode import greedy_decode

    runners = {}
    if "slimwhisper_fp32" in systems:
        runners["slimwhisper_fp32"] = engine.runner
    if "slimwhisper" in systems and engine.device.type == "cpu":
        runners["slimwhisper"] = Transcriber(model, processor, batch_size=batch, quantize="int8").runner
    gen_kwargs = {**generation_kwargs(model, language, 1), "max_length": model.config.max_target_positions}

    def engine_pass(runner, batches) -> int:
        tokens = 0
        for enc in batches:
            rows = torch.tensor([prompt] * enc.shape[0], dtype=torch.long, device=enc.device)
            tokens += sum(len(r.tokens) + 1 for r in greedy_decode(runner, enc, rows, engine.ids))
        return tokens

    @torch.inference_mode()
    def generate_pass(batches) -> int:
        tokens = 0
        for enc in batches:
            seqs = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), **gen_kwargs)
            seqs = seqs if torch.is_tensor(seqs) else seqs["sequences"]
            tokens += sum(_first_eot_lengths(seqs, _prompt_length(seqs, prompt), engine.ids.eot))
        return tokens

    passes = {name: (lambda batches, r=r: engine_pass(r, batches)) for name, r in runners.items()}
    if "hf_generate" in systems:
        passes["hf_generate"] = generate_pass
    return passes


def _timed_rounds(passes: dict[str, Callable[[list], int]], encoded: list,
                  rounds: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of every round of each pass (after a warm-up on the first batch) and the tokens each generated."""
    for fn in passes.values():  # warm-up on the first batch
        fn(encoded[:1])
    times: dict[str, list[float]] = {name: [] for name in passes}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        order = list(passes) if r % 2 == 0 else list(reversed(passes))  # ABBA: drift hits every system alike
        for name in order:
            t0 = time.perf_counter()
            tokens[name] = passes[name](encoded)
            times[name].append(time.perf_counter() - t0)
    return times, tokens


def _per_token_runs(model, processor, audios, language, args, systems) -> dict | None:
    """Decoder-only per-token figures at the run's batch (all windows) and, sequential-style, at batch 1."""
    if not systems or args.no_per_token:
        return None
    rounds = args.per_token_rounds
    out = {f"batch_{args.batch_size}": per_token(model, processor, audios, language, args.batch_size, systems, rounds)}
    if args.batch_size != 1:
        out["batch_1"] = per_token(model, processor, audios, language, 1, systems, rounds,
                                   max_windows=args.per_token_windows)
    return out


def _long_form(args: argparse.Namespace, samples, threads: int) -> dict:
    from ..loading import load
    from .longform import run_long_form

    args.systems = args.systems or list(LONG_FORM_SYSTEMS)
    model, processor = load(args.model)
    result = run_long_form(model.eval(), processor, samples, args, threads)
    return {**result, **run_metadata(model=args.model, data=args.data, batch=args.batch_size, threads=threads,
                                     language=args.language, long_form=True)}


def _report(result: dict, args: argparse.Namespace) -> int:
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for system, value in result["rtf"].items():
            print(f"{system:28s} rtf {value}  wer {result['wer'][system]}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..audio import SAMPLE_RATE, load_audio
    from ..loading import load

    if args.per_token_rounds < 1:  # checked before the timed runs, not after them
        raise SlimWhisperError(f"--per-token-rounds must be at least 1, got {args.per_token_rounds}")
    threads = set_threads(args.threads)
    samples = _samples(args)
    if args.long_form:
        return _report(_long_form(args, samples, threads), args)
    args.systems = args.systems or list(SYSTEMS)
    bad = [s for s in args.systems if s not in SYSTEMS + OPT_IN_SYSTEMS]
    if bad:
        raise SlimWhisperError(f"{', '.join(bad)} run only with --long-form")
    audios = [load_audio(s.audio) for s in samples]
    refs = [s.text for s in samples]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    model, processor = load(args.model)
    model.eval()
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    language = args.language or (samples[0].language if multilingual else None)
    rtf, wer, extra = _run_systems(model, processor, audios, refs, seconds, language, args, threads)
    torch_systems = [s for s in args.systems if s in ("slimwhisper", "slimwhisper_fp32", "hf_generate")]
    result = {
        "rtf": rtf,
        "wer": wer,
        "per_token": _per_token_runs(model, processor, audios, language, args, torch_systems),
        "details": extra,
        "audio_seconds": seconds,
        "utterances": len(samples),
        **run_metadata(model=args.model, data=args.data, batch=args.batch_size, threads=threads, language=language),
    }
    write_result(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    return 0


def _samples(args: argparse.Namespace) -> list:
    """The utterances of `--data` the run uses (`--language`, `--languages`, `--limit`); none is an error."""
    from ..data import open_dataset

    samples = list(open_dataset(args.data, keep_language=args.language, limit=args.limit))
    if args.languages:
        wanted = {code.strip().lower() for code in args.languages.split(",")}
        samples = [s for s in samples if s.language in wanted]
    if not samples:
        raise SlimWhisperError(f"no utterances in {args.data}" + (f" in {args.languages}" if args.languages else ""))
    return samples


def _run_systems(model, processor, audios: list, refs: list[str], seconds: float, language: str | None,
                 args: argparse.Namespace, threads: int) -> tuple[dict, dict, dict]:
    """rtf, WER and details of each system, one after another; a system that cannot run is skipped with the reason."""
    device = next(model.parameters()).device
    rtf: dict = {}
    wer: dict = {}
    extra: dict = {}
    tokenizer = processor.tokenizer
    for system in args.systems:
        try:
            texts, wall, stats = _run_system(system, model, processor, audios, language, args.batch_size, threads,
                                             device, args.kv_cache)
        except (ImportError, SlimWhisperError) as exc:
            rtf[system] = wer[system] = None
            extra[system] = {"skipped": str(exc)}
            continue
        n_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
        rtf[system], wer[system] = wall / seconds, corpus_wer(refs, texts, language or "en")
        extra[system] = {"wall_s": wall, "output_tokens": n_tokens, "ms_per_output_token": 1000 * wall / n_tokens}
        if stats:
            extra[system]["engine"] = stats
        if system == "slimwhisper_compiled":
            extra[system].update(compile_s=stats["warmup_s"], compiled="encoder", graph_breaks=stats["graph_breaks"],
                                 graphs_compiled_while_timed=stats["graphs_compiled_while_timed"])
    return rtf, wer, extra


def _run_system(system: str, model, processor, audios: list, language: str | None, batch: int, threads: int,
                device, kv_cache: str = "float") -> tuple[list[str], float, dict | None]:
    """One system's texts and timed wall, and the engine's stats (None for the other systems)."""
    if system.startswith("slimwhisper"):
        # like for like with faster_whisper_int8: the engine's int8 linears on a CPU
        offered = system == "slimwhisper" and device.type == "cpu"
        quant = "int8" if offered else None
        cache = kv_cache if offered else "float"  # --kv-cache int8 is part of the offered engine only
        compiled = system == "slimwhisper_compiled"
        texts, wall, stats = _engine(model, processor, audios, language, batch, quant, compiled, cache)
        stats["quantize"] = quant
        stats["kv_cache"] = cache
        return texts, wall, stats
    if system == "hf_generate":
        texts, wall = _generate(model, processor, audios, language, batch)
        return texts, wall, None
    compute = {"int8": "int8", "fp32": "float32"}[system.rsplit("_", 1)[1]]
    texts, wall = _faster_whisper(model, audios, language or "en", compute, threads)
    return texts, wall, None


def _print_summary(result: dict) -> None:
    """rtf and WER per system (compile time aside), then the decoder-only per-token figures."""
    rtf, wer, extra = result["rtf"], result["wer"], result["details"]
    for system in rtf:
        compile_s = extra[system].get("compile_s")
        print(f"{system:22s} rtf {rtf[system]}  wer {wer[system]}"
              + (f"  (compile + warm-up {compile_s:.1f} s, not in rtf)" if compile_s is not None else ""))
    for run_name, figures in (result["per_token"] or {}).items():
        for system, ms in figures["ms_per_token"].items():
            print(f"{system:22s} decoder-only {run_name}: {ms:.2f} ms per token")
