"""`Transcriber`: Whisper transcription on the static-cache engine, short- and long-form.

Batched mode (default, fast): every recording is cut into 30-s windows, and the windows of all inputs
are decoded as independent rows of one batch (faster-whisper's batched style; no conditioning across
windows). Sequential mode: each recording advances window by window to the last predicted timestamp,
conditioned on the previous text, like openai-whisper. Both use temperature fallback; with beam_size > 1
the temperature-0 attempt is a beam search (openai-whisper's rule: beams at 0, sampling for the fallbacks).
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..audio import CHUNK_SAMPLES, SAMPLE_RATE, load_audio
from ..errors import SlimWhisperError
from .beam import beam_decode
from .decode import Decoded, DecoderRunner, greedy_decode
from .quantize import quantize as apply_quantization
from .rules import TokenIds

TIME_PER_TIMESTAMP = 0.02  # seconds per timestamp token
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str


@dataclass
class Transcription:
    text: str
    segments: list[Segment]
    language: str | None
    duration: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Window:
    """One ≤30-s piece of one recording."""

    source: int
    offset: float  # seconds
    audio: np.ndarray
    result: Decoded | None = None
    language: str | None = None
    extras: dict = field(default_factory=dict)


def compression_ratio(text: str) -> float:
    """Raw / zlib-compressed byte length: high for repetitive (looping) output."""
    raw = text.encode("utf-8")
    return len(raw) / max(1, len(zlib.compress(raw))) if raw else 0.0


def split_windows(audio: np.ndarray, source: int, window: int = CHUNK_SAMPLES) -> list[_Window]:
    """Consecutive non-overlapping windows of `window` samples (the last one shorter)."""
    starts = range(0, len(audio), window)
    return [_Window(source, start / SAMPLE_RATE, audio[start : start + window]) for start in starts]


def parse_segments(tokens: list[int], ts_begin: int | None, offset: float, end: float, decode) -> list[Segment]:
    """Segments from one window's tokens: text between timestamp pairs, or one segment without timestamps."""
    if ts_begin is None or not any(t >= ts_begin for t in tokens):
        text = decode([t for t in tokens if ts_begin is None or t < ts_begin])
        return [Segment(offset, end, text)] if text.strip() else []
    segments, start, text = [], None, []
    for t in tokens:
        if t < ts_begin:
            text.append(t)
            continue
        time = offset + (t - ts_begin) * TIME_PER_TIMESTAMP
        if start is not None and text:
            segments.append(Segment(start, time, decode(text)))
            start, text = None, []
        else:
            start = time
    if text:
        segments.append(Segment(start if start is not None else offset, end, decode(text)))
    return [s for s in segments if s.text.strip()]


class Transcriber:
    """Fast Whisper transcription (original, MLA or low-rank models) with a static latent cache.

    Example:
        model, processor = slimwhisper.load("tiny.en")
        results = Transcriber(model, processor, quantize="int8").transcribe(["a.wav", "b.flac"])
        print(results[0].text, results[0].segments)
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        beam_size: int = 1,
        quantize: str | None = None,
        compile: bool = False,
        length_penalty: float | None = None,
        patience: float = 1.0,
    ):
        if beam_size < 1 or batch_size < 1:
            raise SlimWhisperError("beam_size and batch_size must be at least 1")
        if patience < 1.0:
            raise SlimWhisperError(f"patience must be at least 1.0, got {patience}")
        if compile and quantize:
            # measured before this check (bench e2e, int8 engine compiled vs not, order swapped): no faster
            # (0.92x and 1.10x of its time), ~50 s of compiling, and WER +0.28 points (BENCHMARKS.md)
            raise SlimWhisperError("compile=True is offered for unquantised models only; drop quantize or compile")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        model = apply_quantization(model.eval(), quantize)
        self.model, self.processor = model, processor
        self.batch_size, self.beam_size = batch_size, beam_size
        self.length_penalty, self.patience = length_penalty, patience
        self.ids = TokenIds.from_generation_config(model.generation_config)
        self.runner = DecoderRunner(model)
        if compile:
            self.runner.encode = torch.compile(self.runner.encode)
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = param.device, param.dtype
        self.stats = {"decode_s": 0.0, "steps": 0, "tokens": 0}  # decode time and work, cumulative

    # ---------------------------------------------------------------- prompts and languages
    @property
    def multilingual(self) -> bool:
        from ..transcribe import is_multilingual

        return is_multilingual(self.model)

    def _sot_sequence(self, language_id: int | None, task: str, timestamps: bool) -> list[int]:
        """SOT [lang task] [<|notimestamps|>], as generate builds it."""
        seq = [self.ids.sot]
        config = self.model.generation_config
        if self.multilingual:
            if language_id is not None:
                seq.append(language_id)
            task_to_id = getattr(config, "task_to_id", None) or {}
            if task not in task_to_id:
                raise SlimWhisperError(f"unknown task {task!r}; choose one of {sorted(task_to_id)}")
            seq.append(task_to_id[task])
        if not timestamps and self.ids.no_timestamps is not None:
            seq.append(self.ids.no_timestamps)
        return seq

    def _language_id(self, language: str) -> int:
        lang_to_id = getattr(self.model.generation_config, "lang_to_id", None) or {}
        token = language if language.startswith("<|") else f"<|{language.lower()}|>"
        if token not in lang_to_id:
            raise SlimWhisperError(f"language {language!r} is not one this model knows ({len(lang_to_id)} languages)")
        return lang_to_id[token]

    @torch.inference_mode()
    def detect_language(self, encoder_out: torch.Tensor) -> list[int]:
        """Most likely language token per row: the SOT-step logits restricted to the language tokens."""
        from .cache import StaticEncoderDecoderCache

        lang_ids = sorted((getattr(self.model.generation_config, "lang_to_id", None) or {}).values())
        cache = StaticEncoderDecoderCache.for_model(self.model, encoder_out.shape[0], 1, dtype=encoder_out.dtype)
        sot = torch.full((encoder_out.shape[0], 1), self.ids.sot, dtype=torch.long, device=self.device)
        logits = self.runner(sot, cache, encoder_out)[:, lang_ids]
        return [lang_ids[i] for i in logits.argmax(dim=-1).tolist()]

    def _prompt_tokens(self, text: str | None) -> list[int]:
        if not text:
            return []
        return self.processor.tokenizer.encode(" " + text.strip(), add_special_tokens=False)

    def _decode_text(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode([t for t in tokens if t < self.ids.eot], skip_special_tokens=True)

    # ---------------------------------------------------------------- core
    def _features(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        feats = self.processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return feats.input_features.to(device=self.device, dtype=self.dtype)

    def _needs_fallback(self, res: Decoded, text: str, thresholds: dict) -> bool:
        ratio, logprob, nospeech = thresholds["compression"], thresholds["logprob"], thresholds["no_speech"]
        if nospeech is not None and logprob is not None and res.no_speech_prob > nospeech and res.avg_logprob < logprob:
            return False  # silence: keep (it will be dropped), do not retry
        if ratio is not None and compression_ratio(text) > ratio:
            return True
        return logprob is not None and res.avg_logprob < logprob

    def _decode_rows(
        self, encoder_out, prompts: list[list[int]], timestamps: bool, temperatures, thresholds
    ) -> list[Decoded]:
        """Decode rows (grouped by prompt length), retrying failing rows at the next temperature."""
        results: list[Decoded | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for i_t, temp in enumerate(temperatures):
            last = i_t == len(temperatures) - 1
            for length in sorted({len(prompts[i]) for i in todo}):
                rows = [i for i in todo if len(prompts[i]) == length]
                prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
                enc = encoder_out[rows] if len(rows) != encoder_out.shape[0] else encoder_out
                t0 = time.perf_counter()
                if self.beam_size > 1 and temp == 0:
                    decoded = beam_decode(self.runner, enc, prompt, self.ids, beam_size=self.beam_size,
                                          timestamps=timestamps, length_penalty=self.length_penalty,
                                          patience=self.patience)
                else:
                    decoded = greedy_decode(self.runner, enc, prompt, self.ids, timestamps=timestamps, temperature=temp)
                self.stats["decode_s"] += time.perf_counter() - t0
                self.stats["steps"] += max(len(r.tokens) + 1 for r in decoded)
                self.stats["tokens"] += sum(len(r.tokens) + 1 for r in decoded)
                for i, res in zip(rows, decoded):
                    results[i] = res
            todo = [i for i in todo if not last and self._needs_fallback(results[i], self._decode_text(
                results[i].tokens), thresholds)]
            if not todo:
                break
        return results

    def _is_silent(self, res: Decoded, thresholds: dict) -> bool:
        nospeech, logprob = thresholds["no_speech"], thresholds["logprob"]
        return (
            nospeech is not None and res.no_speech_prob > nospeech and (logprob is None or res.avg_logprob < logprob)
        )

    # ---------------------------------------------------------------- public API
    def transcribe(
        self,
        audio_or_list,
        language: str | None = None,
        task: str = "transcribe",
        timestamps: bool = False,
        temperature: float | Sequence[float] = DEFAULT_TEMPERATURES,
        condition_on_previous_text: bool = True,
        initial_prompt: str | None = None,
        *,
        mode: str = "batched",
        compression_ratio_threshold: float | None = 2.4,
        logprob_threshold: float | None = -1.0,
        no_speech_threshold: float | None = 0.6,
        progress: bool = False,
    ) -> Transcription | list[Transcription]:
        """Transcribe one input (path or 16 kHz float32 array) or a list of them.

        Args:
            mode: "batched" (30-s windows of all inputs decoded as independent rows; the fast default) or
                "sequential" (windows advance by predicted timestamps, conditioned on the previous text).
            temperature: one value or the fallback ladder; a row is retried at the next temperature when its
                compression ratio or average log-probability crosses the thresholds (openai-whisper's rule).
        Returns:
            a `Transcription` for a single input, else a list in input order.
        """
        single = isinstance(audio_or_list, (str, np.ndarray)) or hasattr(audio_or_list, "__fspath__")
        items = [audio_or_list] if single else list(audio_or_list)
        audios = [np.asarray(a, dtype=np.float32) if isinstance(a, np.ndarray) else load_audio(a) for a in items]
        temps = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
        thresholds = {"compression": compression_ratio_threshold, "logprob": logprob_threshold,
                      "no_speech": no_speech_threshold}
        lang_id = self._language_id(language) if (language and self.multilingual) else None
        if mode == "batched":
            out = self._batched(audios, lang_id, task, timestamps, temps, thresholds, initial_prompt, progress)
        elif mode == "sequential":
            out = [self._sequential(a, lang_id, task, temps, thresholds, condition_on_previous_text,
                                    initial_prompt, timestamps) for a in audios]
        else:
            raise SlimWhisperError(f"unknown mode {mode!r}; choose 'batched' or 'sequential'")
        return out[0] if single else out

    def _language_name(self, lang_id: int | None) -> str | None:
        if lang_id is None:
            return None if self.multilingual else "en"
        return self.processor.tokenizer.convert_ids_to_tokens(lang_id).strip("<|>")

    def _batched(self, audios, lang_id, task, timestamps, temps, thresholds, initial_prompt, progress):
        windows = [w for i, a in enumerate(audios) for w in split_windows(a, i)]
        prev = self._prompt_tokens(initial_prompt)
        prev = [self.ids.prev_sot, *prev] if prev else []
        batches = range(0, len(windows), self.batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="transcribe", unit="batch")
        for start in batches:
            chunk = windows[start : start + self.batch_size]
            with torch.inference_mode():
                enc = self.runner.encode(self._features([w.audio for w in chunk]))
            langs = [lang_id] * len(chunk)
            if self.multilingual and lang_id is None:
                langs = self.detect_language(enc)
            prompts = [prev + self._sot_sequence(lg, task, timestamps) for lg in langs]
            for w, res, lg in zip(chunk, self._decode_rows(enc, prompts, timestamps, temps, thresholds), langs):
                w.result, w.language = res, self._language_name(lg)
        by_source = [[w for w in windows if w.source == i] for i in range(len(audios))]
        return [self._assemble(a, ws, thresholds) for a, ws in zip(audios, by_source)]

    def _assemble(self, audio: np.ndarray, windows: list[_Window], thresholds: dict) -> Transcription:
        duration = len(audio) / SAMPLE_RATE
        segments: list[Segment] = []
        for w in windows:
            if self._is_silent(w.result, thresholds):
                continue
            end = min(duration, w.offset + len(w.audio) / SAMPLE_RATE)
            segments += parse_segments(w.result.tokens, self.ids.timestamp_begin, w.offset, end, self._decode_text)
        text = "".join(s.text for s in segments).strip()
        return Transcription(text, segments, windows[0].language if windows else None, duration)

    def _sequential(self, audio, lang_id, task, temps, thresholds, condition, initial_prompt, timestamps):
        """openai-style: seek by the last complete timestamp pair, prompt with the previous text."""
        duration = len(audio) / SAMPLE_RATE
        history = self._prompt_tokens(initial_prompt)
        segments: list[Segment] = []
        seek, language = 0, None
        max_prompt = self.model.config.max_target_positions // 2 - 1
        while seek < len(audio):
            piece = audio[seek : seek + CHUNK_SAMPLES]
            offset = seek / SAMPLE_RATE
            with torch.inference_mode():
                enc = self.runner.encode(self._features([piece]))
            lg = lang_id if lang_id is not None or not self.multilingual else self.detect_language(enc)[0]
            language = language or self._language_name(lg)
            prev = [self.ids.prev_sot, *history[-max_prompt:]] if history else []
            res = self._decode_rows(enc, [prev + self._sot_sequence(lg, task, True)], True, temps, thresholds)[0]
            seek_step = len(piece)
            if not self._is_silent(res, thresholds):
                end = min(duration, offset + len(piece) / SAMPLE_RATE)
                segments += parse_segments(res.tokens, self.ids.timestamp_begin, offset, end, self._decode_text)
                seek_step = self._seek_step(res.tokens, len(piece))
                text_tokens = [t for t in res.tokens if t < self.ids.eot]
                history = history + text_tokens if condition and res.temperature <= 0.5 else []
            seek += seek_step
        if not timestamps:
            segments = [Segment(s.start, s.end, s.text) for s in segments]
        text = "".join(s.text for s in segments).strip()
        return Transcription(text, segments, language, duration)

    def _seek_step(self, tokens: list[int], window: int) -> int:
        """Samples to advance: to the last closed timestamp when the window ends mid-speech, else the window."""
        tb = self.ids.timestamp_begin
        ts = [t for t in tokens if t >= tb]
        single_ending = len(tokens) >= 2 and tokens[-1] >= tb and tokens[-2] < tb
        if ts and not single_ending and window == CHUNK_SAMPLES:
            step = int((ts[-1] - tb) * TIME_PER_TIMESTAMP * SAMPLE_RATE)
            if step > 0:
                return step
        return window
