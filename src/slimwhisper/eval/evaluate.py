"""`evaluate`: transcribe a dataset with a model (and optionally its baseline), score, log, summarise.

Decoding goes through `transcribe.text_decoder`: the engine by default (what `slimwhisper transcribe`
runs, so the scores are of what users get), or transformers' `generate` with `engine="generate"` (the
reference). Batches hold one language each, given in the prompt of multilingual models (the sample's
language, or `language` to force one); greedy unless `num_beams` > 1. Clips over 30 s are decoded as the
engine decodes long recordings (or long-form `generate`) by default, or skipped and reported with
`long_audio="skip"`; they are never cut silently. Every scored utterance is logged as soon as it is
produced, so a killed run resumes where it stopped. Under several processes (`shard`), each decodes its
share of the plan and the main one merges the logs into the utterances.jsonl and summary one process writes.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

from ..audio import CHUNK_SECONDS, SAMPLE_RATE
from ..data.records import Dataset, Sample, SkipReport, normalize_language
from ..data.stream import iter_audio
from ..decoding import ENGINES, TextDecoder, is_multilingual, text_decoder
from ..errors import SlimWhisperError
from .metrics import char_errors, word_errors
from .normalize import NORMALIZER_VERSION, char_text, normalize
from .report import EvalResult, summarize
from .shards import Shard
from .store import UtteranceStore

LongAudio = Literal["longform", "skip", "error"]
LONG_AUDIO_CHOICES: tuple[str, ...] = ("longform", "skip", "error")


@dataclass
class Candidate:
    """A model under evaluation with its processor; `role` keys its lines in the log ('model'/'baseline');
    `decode` turns a batch of audio into texts (set by `evaluate`)."""

    model: Any
    processor: Any
    tag: str
    role: str = "model"
    decode: TextDecoder | None = None

    @property
    def multilingual(self) -> bool:
        return is_multilingual(self.model)

    def supports(self, language: str | None) -> bool:
        """English-only models transcribe English (or unlabelled audio); multilingual ones their language list."""
        if language is None:
            return True
        if not self.multilingual:
            return language == "en"
        return f"<|{language}|>" in (getattr(self.model.generation_config, "lang_to_id", None) or {})


def model_fingerprint(model: Any) -> str:
    """Cheap weight fingerprint (parameter count + a few values of spread-out tensors) to tell models apart."""
    state = list(model.state_dict().items())
    h = hashlib.sha1(f"{type(model).__name__}:{sum(t.numel() for _, t in state)}".encode())
    for name, tensor in state[:: max(1, len(state) // 16)]:
        h.update(name.encode())
        h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_tag(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "model")


@dataclass
class _Planned:
    sample: Sample
    language: str | None  # decode and scoring language


def score(
    cand: Candidate, sample: Sample, hypothesis: str, language: str | None, audio_seconds: float, seconds: float = 0.0
) -> dict:
    """One log line: texts, normalised texts, word/character edit counts and this utterance's decoding time."""
    ref_n, hyp_n = normalize(sample.text, language), normalize(hypothesis, language)
    w = word_errors(ref_n, hyp_n)
    c = char_errors(char_text(ref_n, language), char_text(hyp_n, language))
    return {
        "model": cand.role, "tag": cand.tag, "id": sample.id, "language": language or "?",
        "duration": round(audio_seconds, 3), "long_form": audio_seconds > CHUNK_SECONDS,
        "decode_seconds": round(seconds, 4),
        "reference": sample.text, "hypothesis": hypothesis, "ref_norm": ref_n, "hyp_norm": hyp_n,
        "word_errors": w.errors, "n_words": w.n_ref, "word_sub": w.substitutions, "word_del": w.deletions,
        "word_ins": w.insertions, "char_errors": c.errors, "n_chars": c.n_ref,
    }


def _plan(
    samples: Sequence[Sample], cands: list[Candidate], language: str | None, report: SkipReport
) -> list[_Planned]:
    """Decode language per sample; languages a model cannot transcribe are reported, not decoded."""
    english_only = any(not c.multilingual for c in cands)
    plan = []
    for s in samples:
        lang = language or s.language or ("en" if english_only else None)
        refusing = [c.tag for c in cands if not c.supports(lang)]
        if refusing:
            report.add(s.id, "unsupported language", f"{', '.join(refusing)} cannot transcribe '{lang}'")
            continue
        plan.append(_Planned(s, lang))
    # one language per batch, longest first so long-form batches pad little
    return sorted(plan, key=lambda p: (p.language or "", -(p.sample.duration or 0.0)))


def _batches(plan: list[_Planned], size: int) -> Iterable[list[_Planned]]:
    for _, group in groupby(plan, key=lambda p: p.language):
        items = list(group)
        for i in range(0, len(items), size):
            yield items[i : i + size]


def evaluate(
    model: Any,
    processor: Any,
    samples: Dataset | Sequence[Sample],
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    language: str | None = None,
    out_dir: str | Path,
    baseline: tuple[Any, Any] | None = None,
    tag: str | None = None,
    baseline_tag: str | None = None,
    device: str | None = None,
    dtype: Any = None,
    max_new_tokens: int | None = None,
    long_audio: LongAudio = "longform",
    engine: str = "fast",
    quantize: str | None = None,
    kv_cache: str = "float",
    on_error: Literal["skip", "raise"] = "skip",
    n_bootstrap: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    shard: Shard | None = None,
) -> EvalResult:
    """Evaluate `model` (and `baseline`, a (model, processor) pair) on `samples`; write the log and return scores.

    `language` forces one decoding language for every sample; otherwise each sample's own is used.
    `device`/`dtype`, when given, move the models there first. `engine` is "fast" (the engine, as
    `slimwhisper transcribe` runs it) or "generate" (transformers' generate, the reference); the engine may
    run int8 linears (`quantize="int8"`) and an int8 KV cache (`kv_cache="int8"`), both models alike. `shard`
    (`shards.current_shard`) splits the work when the process is one of several; every process returns the
    same scores, only the main one writes the summaries.
    """
    shard = shard or Shard()
    check_settings(batch_size, num_beams, engine, long_audio, max_new_tokens, n_bootstrap)
    language = normalize_language(language)
    report = SkipReport()
    samples, source = _sample_list(samples, report)
    cands = _candidates(model, processor, baseline, tag, baseline_tag, device, dtype,
                        engine=engine, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
                        quantize=quantize, kv_cache=kv_cache)
    settings = {"models": _model_settings(cands), "engine": engine, "num_beams": num_beams, "language": language,
                "max_new_tokens": max_new_tokens, "long_audio": long_audio, "normalizer": NORMALIZER_VERSION,
                "data": source}
    # recorded only when used, so logs of runs without them still resume
    settings.update({k: v for k, v in (("quantize", quantize), ("kv_cache", kv_cache)) if v not in (None, "float")})
    store = UtteranceStore(Path(out_dir), settings, rank=shard.rank, world=shard.world)
    plan = _plan(samples, cands, language, report)
    started = time.perf_counter()
    _decode_share(cands, plan, store, report, shard, batch_size=batch_size, long_audio=long_audio,
                  on_error=on_error, progress=progress)
    _merge_logs(store, plan, cands, shard)
    return summarize(
        store, [c.role for c in cands], {c.role: c.tag for c in cands}, [p.sample.id for p in plan], report=report,
        settings=settings, out_dir=Path(out_dir), wall_seconds=time.perf_counter() - started,
        n_bootstrap=n_bootstrap, seed=seed, write=shard.main,
    )


def check_settings(batch_size: int, num_beams: int, engine: str, long_audio: str, max_new_tokens: int | None,
                   n_bootstrap: int) -> None:
    """Refuse impossible settings before any model is touched."""
    if batch_size < 1 or num_beams < 1:
        raise SlimWhisperError("batch_size and num_beams must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SlimWhisperError("max_new_tokens (--max-new-tokens) must be at least 1")
    if n_bootstrap < 1:
        raise SlimWhisperError("the paired bootstrap (--bootstrap) needs at least 1 draw")
    if engine not in ENGINES:
        raise SlimWhisperError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")
    if long_audio not in LONG_AUDIO_CHOICES:
        raise SlimWhisperError(f"unknown long_audio '{long_audio}'; use one of {', '.join(LONG_AUDIO_CHOICES)}")


def _sample_list(samples: Dataset | Sequence[Sample], report: SkipReport) -> tuple[list[Sample], str]:
    """The samples as a list and a label of their source; a dataset's own skips go into `report`."""
    if isinstance(samples, Dataset):
        report.extend(samples.report)
        source = str(samples.source)
    else:
        source = "samples"
    samples = list(samples)
    if len({s.id for s in samples}) != len(samples):
        raise SlimWhisperError("sample ids must be unique (the log is keyed by id); open the data with open_dataset")
    return samples, source


def _candidates(model: Any, processor: Any, baseline: tuple[Any, Any] | None, tag: str | None,
                baseline_tag: str | None, device: str | None, dtype: Any, *, engine: str, batch_size: int,
                num_beams: int, max_new_tokens: int | None, quantize: str | None = None,
                kv_cache: str = "float") -> list[Candidate]:
    """The model (and baseline) in eval mode on `device`/`dtype`, each with its text decoder."""
    cands = [Candidate(model, processor, tag or default_tag(model), "model")]
    if baseline is not None:
        cands.append(Candidate(baseline[0], baseline[1], baseline_tag or default_tag(baseline[0]), "baseline"))
    for c in cands:
        if device is not None or dtype is not None:
            c.model.to(device=device, dtype=dtype)
        c.model.eval()
        c.decode = text_decoder(c.model, c.processor, engine=engine, batch_size=batch_size, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, quantize=quantize, kv_cache=kv_cache)
    return cands


def _model_settings(cands: list[Candidate]) -> dict[str, dict[str, str]]:
    """Each candidate's tag, weight fingerprint and dtype, so a resumed log is never one of other models."""
    return {c.role: {"tag": c.tag, "fingerprint": model_fingerprint(c.model),
                     "dtype": str(next(c.model.parameters()).dtype)} for c in cands}


def _decode_share(cands: list[Candidate], plan: list[_Planned], store: UtteranceStore, report: SkipReport,
                  shard: Shard, **options: Any) -> None:
    """Decode this process's share of the plan that no log holds yet, then collect every process's skips into
    `report` in plan order, so the report does not depend on how the work was split."""
    mine = shard.take(plan)
    done = {c.role: store.done(c.role) for c in cands}
    pending = [p for p in mine if any(p.sample.id not in done[c.role] for c in cands)]
    decoding = SkipReport()
    _decode_batches(cands, pending, done, store, decoding, n_planned=len(mine), **options)
    position = {p.sample.id: i for i, p in enumerate(plan)}
    skipped = [item for part in shard.gather(decoding.items) for item in part]
    report.items.extend(sorted(skipped, key=lambda item: position.get(item.id, len(position))))


def _merge_logs(store: UtteranceStore, plan: list[_Planned], cands: list[Candidate], shard: Shard) -> None:
    """The main process rewrites utterances.jsonl in plan order from every log; the others wait, then read it.

    The gather in `_decode_share` already held everyone until all had logged their share.
    """
    if shard.main:
        store.merge((c.role, p.sample.id) for p in plan for c in cands)
    shard.barrier()
    if not shard.main:
        store.reload()


def _decode_batches(cands: list[Candidate], pending: list[_Planned], done: dict[str, set[str]],
                    store: UtteranceStore, report: SkipReport, *, n_planned: int, batch_size: int, long_audio: str,
                    on_error: str, progress: bool) -> None:
    """Decode and score the pending samples batch by batch; each batch is logged at once, so a killed run resumes
    after it."""
    from tqdm.auto import tqdm

    with tqdm(total=n_planned, initial=n_planned - len(pending), unit="utt", disable=not progress,
              desc=f"eval {cands[0].tag}") as bar:
        for batch in _batches(pending, batch_size):
            lang = batch[0].language
            loaded = list(iter_audio([p.sample for p in batch], report=report, on_error=on_error,
                                     on_long="keep" if long_audio == "longform" else long_audio,
                                     max_seconds=CHUNK_SECONDS))
            for c in cands:
                todo = [(s, a) for s, a in loaded if s.id not in done[c.role]]
                if not todo:
                    continue
                t0 = time.perf_counter()
                hyps = c.decode([a for _, a in todo], lang)
                share = (time.perf_counter() - t0) / len(todo)  # batch time split evenly, for the RTF
                store.append([score(c, s, h, lang, len(a) / SAMPLE_RATE, share) for (s, a), h in zip(todo, hyps)])
            bar.update(len(batch))
