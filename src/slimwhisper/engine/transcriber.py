"""`Transcriber`: Whisper transcription of recordings of any length on the static-cache engine.

Batched mode (default, fast): voice activity detection finds the speech, consecutive speech is packed
into windows of at most 30 s cut in silences (never mid-word), and the windows of all inputs are decoded
as independent rows of one batch, as faster-whisper's batched pipeline and WhisperX do. Audio without
speech gives no window, hence no text.

Sequential mode (openai-whisper's and transformers' long-form algorithm): the log-mel spectrogram of
the whole recording is computed once; each 30-s window starts where the previous one's last complete
segment ended, is decoded with timestamps, and is conditioned on the previous windows' tokens
(timestamps included, as the model was trained). Windows the detector finds silent are skipped.

Both modes use temperature fallback (a window is retried hotter when its text compresses too well, a
sign of a loop, or its average log-probability is too low), and the no-speech gate (a window whose
P(<|nospeech|>) is high and whose text is improbable gives nothing). With beam_size > 1 the
temperature-0 attempt is a beam search. `stats` counts windows, retries and skips.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..audio import CHUNK_SAMPLES, SAMPLE_RATE, load_audio, window_spans
from ..errors import SlimWhisperError
from ..tokens import TokenIds, decoder_prompt
from .beam import beam_decode
from .decode import Decoded, DecoderRunner, greedy_decode, language_probabilities
from .quantize import quantize as apply_quantization
from .segments import (
    FRAMES_PER_TIMESTAMP,
    SECONDS_PER_TIMESTAMP,
    Segment,
    Transcription,
    compression_ratio,
    parse_segments,
    window_segments,
)
from .vad import audible_regions, find_speech, overlap

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LANGUAGE_SWITCH = 0.5  # a window leaves its recording's language only when this sure of another
REST_MIN_SPEECH_S = 0.5  # speech after a window's last segment that is worth a window of its own
HOP = 160  # samples per log-mel frame
WINDOW_FRAMES = CHUNK_SAMPLES // HOP  # 3000 log-mel frames in one window

__all__ = ["Segment", "Thresholds", "Transcriber", "Transcription"]


@dataclass(eq=False)  # windows are distinct pieces of work, compared by identity
class _Window:
    """One ≤30-s piece of one recording."""

    source: int
    offset: float  # seconds
    audio: np.ndarray
    result: Decoded | None = None
    language: int | None = None
    speech: list[tuple[int, int]] = field(default_factory=list)  # speech regions, samples from `offset`
    timestamps: bool = False  # decode with timestamp tokens
    voiced: bool = True  # the detector heard speech in it (always, when the detector cut the windows)
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Thresholds:
    """openai-whisper's retry and no-speech rules (None turns a rule off).

    A window is retried hotter when its text loops (compression ratio above `compression`) and, with
    `retry_improbable`, also when its average log-probability is below `logprob` (openai-whisper's full rule).
    Retrying merely improbable windows is off by default: on the multilingual long recordings we measured, the
    sampled retries were no better than the greedy text and made results vary from run to run, while loops
    are what sampling repairs. `logprob` still serves the no-speech gate.
    """

    compression: float | None = 2.4
    logprob: float | None = -1.0
    no_speech: float | None = 0.6
    retry_improbable: bool = False

    def silent(self, res: Decoded, voiced: bool = True) -> bool:
        """The no-speech gate: P(<|nospeech|>) high and either the text improbable (openai-whisper's rule) or
        the voice detector hearing no speech in the window.

        The model alone writes a confident "you" on short stretches of room tone; the detector alone misses
        speech now and then. Both together drop a window only when model and detector agree.
        """
        if self.no_speech is None or res.no_speech_prob <= self.no_speech:
            return False
        return not voiced or self.logprob is None or res.avg_logprob < self.logprob

    def best(self, attempts: list[Decoded], decode_text) -> Decoded:
        """The attempt to keep when every temperature failed: the most probable one that does not loop
        (faster-whisper's rule; openai-whisper keeps the last, hottest attempt)."""
        looping = [self.compression is not None and compression_ratio(decode_text(a.tokens)) > self.compression
                   for a in attempts]
        candidates = [a for a, loops in zip(attempts, looping) if not loops] or attempts
        return max(candidates, key=lambda a: a.avg_logprob)

    def retry(self, res: Decoded, text: str) -> bool:
        """Whether a window's result should be decoded again at the next temperature."""
        if self.silent(res) and self.logprob is not None:
            return False  # silence: kept (and dropped), not retried
        if self.compression is not None and compression_ratio(text) > self.compression:
            return True
        return self.retry_improbable and self.logprob is not None and res.avg_logprob < self.logprob


class Transcriber:
    """Fast Whisper transcription (original, MLA or low-rank models) with a static latent cache.

    Example:
        model, processor = slimwhisper.load("tiny.en")
        results = Transcriber(model, processor, quantize="int8").transcribe(["a.wav", "b.flac"])
        print(results[0].text, results[0].segments)

    `quantize="int8"` runs int8 linears; `kv_cache="int8"` keeps the decoder cache in int8 with a scale per
    position and head (less memory, slower steps on a CPU; docs/mla.md, int8 cache).
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
        vad: bool = True,
        seed: int = 0,
        max_new_tokens: int | None = None,
        kv_cache: str = "float",
    ):
        if beam_size < 1 or batch_size < 1:
            raise SlimWhisperError("beam_size and batch_size must be at least 1")
        if patience < 1.0:
            raise SlimWhisperError(f"patience must be at least 1.0, got {patience}")
        if compile and quantize:
            # measured: no faster and WER moved (BENCHMARKS.md, bench e2e with slimwhisper_compiled)
            raise SlimWhisperError("compile=True is offered for unquantised models only; drop quantize or compile")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        model = apply_quantization(model.eval(), quantize)
        self.model, self.processor = model, processor
        self.batch_size, self.beam_size, self.vad, self.seed = batch_size, beam_size, vad, seed
        self.max_new_tokens = max_new_tokens  # per window (None: as many as the decoder's positions allow)
        self.length_penalty, self.patience = length_penalty, patience
        self.ids = TokenIds.from_generation_config(model.generation_config)
        self.runner = DecoderRunner(model, kv_cache=kv_cache)
        if compile:
            self.runner.encode = torch.compile(self.runner.encode)
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = param.device, param.dtype
        self.stats = self.new_stats()

    @staticmethod
    def new_stats() -> dict:
        """Cumulative work counters: decode time, steps and tokens; windows decoded, temperature retries, windows
        found silent; batched mode's windows decoded again with timestamps, and windows continued."""
        return {"decode_s": 0.0, "steps": 0, "tokens": 0, "windows": 0, "retries": 0, "silent_windows": 0,
                "redecoded": 0, "continued": 0}

    # ---------------------------------------------------------------- prompts and languages
    @property
    def multilingual(self) -> bool:
        return self.ids.multilingual

    def sot_sequence(self, language_id: int | None, task: str, timestamps: bool) -> list[int]:
        """SOT [lang task] [<|notimestamps|>], as generate builds it."""
        return decoder_prompt(self.ids, language_id, task, timestamps)

    def language_id(self, language: str) -> int:
        return self.ids.language_id(language)

    def detect_language(self, encoder_out: torch.Tensor) -> list[int]:
        """Most likely language token per row."""
        return self.language_probabilities(encoder_out)[0]

    def language_probabilities(self, encoder_out: torch.Tensor) -> tuple[list[int], list[float]]:
        """Most likely language token per row and its probability (`decode.language_probabilities`)."""
        return language_probabilities(self.runner, self.ids, encoder_out)

    def _prompt_tokens(self, text: str | None) -> list[int]:
        if not text:
            return []
        return self.processor.tokenizer.encode(" " + text.strip(), add_special_tokens=False)

    def decode_text(self, tokens: list[int]) -> str:
        """Text of generated tokens (timestamps and other special tokens left out)."""
        return self.processor.tokenizer.decode([t for t in tokens if t < self.ids.eot], skip_special_tokens=True)

    def _language_name(self, lang_id: int | None) -> str | None:
        if lang_id is None:
            return None if self.multilingual else "en"
        return self.processor.tokenizer.convert_ids_to_tokens(lang_id).strip("<|>")

    # ---------------------------------------------------------------- core
    def features(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features [B, mels, 3000] of ≤30-s pieces (each zero-padded to 30 s)."""
        feats = self.processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return feats.input_features.to(device=self.device, dtype=self.dtype)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.runner.encode(features)

    def log_mel(self, audio: np.ndarray) -> torch.Tensor:
        """Log-mel features [mels, frames + 3000] of a whole recording, then 3000 frames of zeros.

        One spectrogram for the recording, as transformers' long-form `generate` computes it: windows sliced
        from it share one level normalisation, and a short last window is padded with zero features, as there
        (openai-whisper pads the audio with silence instead; the two can differ in that last window).
        """
        feats = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                 truncation=False, padding="longest").input_features[0]
        feats = torch.nn.functional.pad(feats, (0, WINDOW_FRAMES))
        return feats.to(device=self.device, dtype=self.dtype)

    def _decode(self, enc, prompt: torch.Tensor, timestamps: bool, temperature: float) -> list[Decoded]:
        t0 = time.perf_counter()
        max_length = prompt.shape[1] + self.max_new_tokens if self.max_new_tokens else None
        if self.beam_size > 1 and temperature == 0:
            decoded = beam_decode(self.runner, enc, prompt, self.ids, beam_size=self.beam_size, max_length=max_length,
                                  timestamps=timestamps, length_penalty=self.length_penalty, patience=self.patience)
        else:
            generator = torch.Generator(device=self.device).manual_seed(self.seed) if temperature > 0 else None
            decoded = greedy_decode(self.runner, enc, prompt, self.ids, timestamps=timestamps, temperature=temperature,
                                    generator=generator, max_length=max_length)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["steps"] += max(len(r.tokens) + 1 for r in decoded)
        self.stats["tokens"] += sum(len(r.tokens) + 1 for r in decoded)
        return decoded

    def decode_rows(self, encoder_out: torch.Tensor, prompts: list[list[int]], timestamps: bool,
                    temperatures: Sequence[float], thresholds: Thresholds) -> list[Decoded]:
        """Decode rows (grouped by prompt length), retrying failing rows at the next temperature.

        A row that fails at every temperature keeps its best attempt (`Thresholds.best`), not its last one.
        """
        attempts: list[list[Decoded]] = [[] for _ in prompts]
        todo = list(range(len(prompts)))
        self.stats["windows"] += len(prompts)
        for step, temp in enumerate(temperatures):
            for length in sorted({len(prompts[i]) for i in todo}):
                rows = [i for i in todo if len(prompts[i]) == length]
                prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
                enc = encoder_out[rows] if len(rows) != encoder_out.shape[0] else encoder_out
                for i, res in zip(rows, self._decode(enc, prompt, timestamps, temp)):
                    attempts[i].append(res)
            todo = [i for i in todo if thresholds.retry(attempts[i][-1], self.decode_text(attempts[i][-1].tokens))]
            if not todo or step == len(temperatures) - 1:
                break
            self.stats["retries"] += len(todo)
        failed = set(todo)
        return [thresholds.best(a, self.decode_text) if i in failed else a[-1] for i, a in enumerate(attempts)]

    # ---------------------------------------------------------------- public API
    def transcribe(
        self,
        audio_or_list,
        language: str | None = None,
        task: str = "transcribe",
        timestamps: bool = False,
        temperature: float | Sequence[float] = DEFAULT_TEMPERATURES,
        condition_on_previous_text: bool = False,
        initial_prompt: str | None = None,
        *,
        mode: str = "batched",
        vad: bool | None = None,
        compression_ratio_threshold: float | None = 2.4,
        logprob_threshold: float | None = -1.0,
        no_speech_threshold: float | None = 0.6,
        retry_improbable: bool = False,
        progress: bool = False,
    ) -> Transcription | list[Transcription]:
        """Transcribe one input (path or 16 kHz float32 array) or a list of them.

        Args:
            mode: "batched" (speech packed into ≤30-s windows cut at silences, all windows of all inputs
                decoded as independent rows; the fast default) or "sequential" (windows advance by the
                predicted timestamps).
            timestamps: batched mode decodes with timestamp tokens, so segments get Whisper's own times
                (without, a segment spans its window's speech); sequential mode always does.
            condition_on_previous_text: sequential mode prompts each window with the previous windows'
                tokens (openai-whisper's default). Off by default, as in transformers: on tiny.en it cost
                WER on most long recordings we measured (BENCHMARKS.md), and it lets one error loop on.
            vad: find speech with the voice activity detector (default: the Transcriber's setting). Without
                it, batched mode cuts fixed 30-s windows and sequential mode decodes every window.
            temperature: one value or the fallback ladder; a window is retried at the next temperature when its
                text loops (compression ratio above the threshold) or, with `retry_improbable`, when its average
                log-probability is below `logprob_threshold` (openai-whisper's rule). Sampling is seeded
                (`Transcriber(seed=...)`), so results repeat.
        Returns:
            a `Transcription` for a single input, else a list in input order.
        """
        single = isinstance(audio_or_list, (str, np.ndarray)) or hasattr(audio_or_list, "__fspath__")
        items = [audio_or_list] if single else list(audio_or_list)
        audios = [np.asarray(a, dtype=np.float32) if isinstance(a, np.ndarray) else load_audio(a) for a in items]
        temps = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
        thresholds = Thresholds(compression_ratio_threshold, logprob_threshold, no_speech_threshold, retry_improbable)
        lang_id = self.language_id(language) if (language and self.multilingual) else None
        vad = self.vad if vad is None else vad
        if mode == "batched":
            out = self._batched(audios, lang_id, task, timestamps, temps, thresholds, initial_prompt, vad, progress)
        elif mode == "sequential":
            options = (lang_id, task, temps, thresholds, condition_on_previous_text, initial_prompt, vad)
            sources = _progress(audios, progress, "transcribe", "file")
            out = [self._sequential(a, *options) for a in sources]
        else:
            raise SlimWhisperError(f"unknown mode {mode!r}; choose 'batched' or 'sequential'")
        return out[0] if single else out

    # ---------------------------------------------------------------- batched mode
    def windows(self, audio: np.ndarray, source: int = 0, vad: bool = True) -> list[_Window]:
        """The ≤30-s windows batched mode decodes: speech packed at silences, or fixed 30-s cuts without VAD.

        A recording of at most 30 s with any speech in it is one window, whole, as short-form Whisper
        decodes it (so the engine's text is `generate`'s).
        """
        if not vad:  # fixed 30-s cuts; the energy check drops windows with nothing audible
            audible, voiced = audible_regions(audio), find_speech(audio)[0]
            return [_Window(source, a / SAMPLE_RATE, audio[a:b], voiced=overlap(voiced, a, b) > 0)
                    for a, b in window_spans(len(audio)) if overlap(audible, a, b)]
        regions, spans = find_speech(audio)
        if len(audio) <= CHUNK_SAMPLES and spans:
            spans = [(0, len(audio))]
        return [_Window(source, a / SAMPLE_RATE, audio[a:b], speech=[(max(r0, a) - a, min(r1, b) - a)
                for r0, r1 in regions if r1 > a and r0 < b]) for a, b in spans]

    def _batched(self, audios, lang_id, task, timestamps, temps, thresholds, initial_prompt, vad, progress):
        queue = [w for i, a in enumerate(audios) for w in self.windows(a, i, vad)]
        for w in queue:
            w.timestamps = timestamps
        prev = self._prompt_tokens(initial_prompt)[-(self.model.config.max_target_positions // 2 - 1):]
        prev = [self.ids.prev_sot, *prev] if prev else []
        file_language: dict[int, int | None] = {}
        done: list[_Window] = []
        bar = _progress(None, progress, "transcribe", "window", total=len(queue))
        while queue:
            chunk, queue = queue[: self.batch_size], queue[self.batch_size :]
            enc = self.encode(self.features([w.audio for w in chunk]))
            self._assign_languages(chunk, enc, lang_id, file_language)
            self._decode_windows(chunk, enc, prev, task, temps, thresholds)
            for w in chunk:
                rest = self._rest_of(w, thresholds) if w.timestamps else None
                if rest is not None:
                    queue.append(rest)
                    self.stats["continued"] += 1
                done.append(w)
            if not queue:  # all decoded: windows whose text is implausibly short go again, with timestamps
                queue = stopped_early(done, thresholds)
                done = [w for w in done if w not in queue]
                for w in queue:
                    w.timestamps = True
                self.stats["redecoded"] += len(queue)
            bar.total = len(done) + len(queue)
            bar.update(len(chunk))
        bar.close()
        done.sort(key=lambda w: (w.source, w.offset))
        by_source = [[w for w in done if w.source == i] for i in range(len(audios))]
        return [self._assemble(a, ws, thresholds, lang_id) for a, ws in zip(audios, by_source)]

    def _decode_windows(self, chunk: list[_Window], enc: torch.Tensor, prev: list[int], task: str,
                        temps: Sequence[float], thresholds: Thresholds) -> None:
        """Decode a batch of windows, those with timestamps and those without as two groups."""
        for timestamps in (False, True):
            rows = [i for i, w in enumerate(chunk) if w.timestamps == timestamps]
            if not rows:
                continue
            prompts = [prev + self.sot_sequence(chunk[i].language, task, timestamps) for i in rows]
            sub = enc if len(rows) == len(chunk) else enc[rows]
            for i, res in zip(rows, self.decode_rows(sub, prompts, timestamps, temps, thresholds)):
                chunk[i].result = res

    def _rest_of(self, window: _Window, thresholds: Thresholds) -> _Window | None:
        """The part of a decoded window after its last segment, when the detector heard speech there, else None.

        Whisper ends a window early when it expects the next window to carry on (the sequential algorithm),
        and now and then it stops although speech follows; the rest becomes a window of its own, decoded in
        a later batch, and this window keeps only its closed segments.
        """
        if thresholds.silent(window.result, window.voiced) or not window.speech:
            return None
        found = window_segments(window.result.tokens, self.ids.timestamp_begin, -(-len(window.audio) // HOP))
        cut = found.segments[-1][1] * FRAMES_PER_TIMESTAMP * HOP if found.segments else 0
        if cut <= 0 or overlap(window.speech, cut, len(window.audio)) < REST_MIN_SPEECH_S * SAMPLE_RATE:
            return None
        window.extras["closed"] = found.segments
        return _Window(window.source, window.offset + cut / SAMPLE_RATE, window.audio[cut:],
                       speech=[(max(a - cut, 0), b - cut) for a, b in window.speech if b > cut])

    def _assign_languages(self, chunk: list[_Window], enc, lang_id, file_language: dict) -> None:
        """Each window's language: given, else detected (`pick_language`); a file's first window sets the file's."""
        if lang_id is not None or not self.multilingual:
            for w in chunk:
                w.language = lang_id
            return
        for w, lang, p in zip(chunk, *self.language_probabilities(enc)):
            w.language = pick_language(lang, p, file_language.setdefault(w.source, lang))

    def _assemble(self, audio: np.ndarray, windows: list[_Window], thresholds: Thresholds,
                  lang_id: int | None) -> Transcription:
        """A recording's transcript from its decoded windows; its language is the one most of its windows had."""
        duration = len(audio) / SAMPLE_RATE
        heard = Counter({lang_id: 0.0})
        for w in windows:
            heard[w.language] += len(w.audio)
        lang_id = heard.most_common(1)[0][0]
        segments: list[Segment] = []
        for w in windows:
            if thresholds.silent(w.result, w.voiced):
                self.stats["silent_windows"] += 1
            elif "closed" in w.extras:  # the rest of the window was decoded as a window of its own
                segments += [Segment(w.offset + a * SECONDS_PER_TIMESTAMP, w.offset + b * SECONDS_PER_TIMESTAMP,
                                     self.decode_text(toks)) for a, b, toks in w.extras["closed"]]
            else:
                end = min(duration, w.offset + len(w.audio) / SAMPLE_RATE)
                segments += parse_segments(w.result.tokens, self.ids.timestamp_begin, w.offset, end,
                                           self.decode_text)
        segments = [s for s in segments if s.text.strip()]
        text = "".join(s.text for s in segments).strip()
        return Transcription(text, segments, self._language_name(lang_id), duration)

    # ---------------------------------------------------------------- sequential mode
    def _sequential(self, audio, lang_id, task, temps, thresholds, condition, initial_prompt, vad) -> Transcription:
        """openai-whisper's long-form loop over one recording (see `sequential`)."""
        voiced = _speech_frames(audio)
        speech = voiced if vad else _speech_frames(audio, vad=False)
        segments, lang_id = self.sequential(self.log_mel(audio), len(audio) // HOP, lang_id, task, temps, thresholds,
                                            condition, self._prompt_tokens(initial_prompt), speech, voiced)
        text = "".join(s.text for s in segments).strip()
        return Transcription(text, segments, self._language_name(lang_id), len(audio) / SAMPLE_RATE)

    def sequential(self, mel: torch.Tensor, frames: int, lang_id: int | None, task: str, temps: Sequence[float],
                   thresholds: Thresholds, condition: bool = True, history: Sequence[int] = (),
                   speech: list[tuple[int, int]] | None = None, voiced: list[tuple[int, int]] | None = None,
                   ) -> tuple[list[Segment], int | None]:
        """Segments of the first `frames` frames of `mel` [mels, >= frames + 3000], window after window.

        Each window starts where the previous one's last closed segment ended and is conditioned on the
        tokens before it (`history` first). `speech` (frame ranges) lets windows without speech be skipped;
        `voiced` (the detector's speech, frame ranges) is the no-speech gate's second opinion, and a window
        that stopped before the voiced audio in it ended is followed by one starting where its text ended.
        Returns the segments and the language (given, else detected per window: `pick_language`) that most
        of the decoded audio had.
        """
        history, max_history = list(history), self.model.config.max_target_positions // 2 - 1
        segments: list[Segment] = []
        seek, recording, heard = 0, None, Counter()
        while True:
            seek = _next_speech(seek, speech) if speech is not None else seek
            if seek >= frames:
                return [s for s in segments if s.text.strip()], (heard.most_common(1)[0][0] if heard else lang_id)
            size = min(WINDOW_FRAMES, frames - seek)
            enc = self.encode(mel[None, :, seek : seek + WINDOW_FRAMES])
            language = lang_id
            if lang_id is None and self.multilingual:
                (detected,), (p,) = self.language_probabilities(enc)
                language = pick_language(detected, p, recording or detected)
            prev = [self.ids.prev_sot, *history[-max_history:]] if history else []
            res = self.decode_rows(enc, [prev + self.sot_sequence(language, task, True)], True, temps, thresholds)[0]
            if thresholds.silent(res, voiced is None or overlap(voiced, seek, seek + size) > 0):
                self.stats["silent_windows"] += 1
                seek += size
                continue
            recording = recording or language  # the first window with speech sets the recording's language
            found = window_segments(res.tokens, self.ids.timestamp_begin, size)
            offset = seek * HOP / SAMPLE_RATE
            segments += [Segment(offset + a * SECONDS_PER_TIMESTAMP, offset + b * SECONDS_PER_TIMESTAMP,
                                 self.decode_text(toks)) for a, b, toks in found.segments]
            history = history + found.history if condition and res.temperature <= 0.5 else []
            advance = found.advance
            last_end = found.segments[-1][1] * FRAMES_PER_TIMESTAMP if found.segments else 0
            if voiced is not None and advance >= size and _unheard_rest(last_end, (seek, seek + size), voiced):
                advance = last_end  # the detector heard speech after the last segment: decode it next
                self.stats["continued"] += 1
            advance = max(advance, FRAMES_PER_TIMESTAMP)  # always move on, even on a degenerate window
            heard[language] += advance
            seek += advance


def pick_language(detected: int, probability: float, recording: int) -> int:
    """A window's language: the one detected in it when the detector is sure (a recording may change language,
    as a multilingual meeting does), else its recording's (set by the recording's first window)."""
    return detected if probability >= LANGUAGE_SWITCH else recording


def stopped_early(windows: list[_Window], thresholds: Thresholds, min_speech_s: float = 3.0,
                  rel_rate: float = 0.5, min_rate: float = 1.5) -> list[_Window]:
    """Windows decoded without timestamps whose text is implausibly short for the speech the detector heard.

    Whisper without timestamps now and then ends a window after its first sentences. Such a window yields
    far fewer tokens per second of speech than its recording's other windows (below `rel_rate` times their
    median), or than any speech does (`min_rate`: speech in any language gives several tokens a second).
    """
    def rate(w: _Window) -> float:
        return len(w.result.tokens) / (overlap(w.speech, 0, len(w.audio)) / SAMPLE_RATE)

    judged = [w for w in windows if not w.timestamps and not thresholds.silent(w.result, w.voiced)
              and overlap(w.speech, 0, len(w.audio)) >= min_speech_s * SAMPLE_RATE]
    out = []
    for source in {w.source for w in judged}:
        mine = [w for w in judged if w.source == source]
        floor = max(min_rate, rel_rate * float(np.median([rate(w) for w in mine])))
        out += [w for w in mine if rate(w) < floor]
    return sorted(out, key=lambda w: (w.source, w.offset))


def _speech_frames(audio: np.ndarray, vad: bool = True) -> list[tuple[int, int]]:
    """Speech regions of `audio` (unpadded; without `vad`, its audible stretches) in log-mel frames."""
    regions = find_speech(audio)[0] if vad else audible_regions(audio)
    return [(a // HOP, -(-b // HOP)) for a, b in regions]


def _next_speech(seek: int, speech: list[tuple[int, int]], lead: int = 40) -> int:
    """`seek` if speech starts within a window from it, else `lead` frames before the next speech (or past the
    end): silent stretches are skipped, not decoded."""
    for start, end in speech:
        if end > seek:
            return seek if start < seek + WINDOW_FRAMES else max(seek, start - lead)
    return 1 << 62


def _unheard_rest(found_end: int, window: tuple[int, int], speech: list[tuple[int, int]]) -> bool:
    """Whether speech follows a window's last segment (ending `found_end` frames into `window`, in frames):
    Whisper then stopped early, and the next window should start there rather than after this one."""
    start, end = window
    return 0 < found_end and overlap(speech, start + found_end, end) >= REST_MIN_SPEECH_S * SAMPLE_RATE / HOP


def _progress(items, show: bool, desc: str, unit: str, total: int | None = None):
    """`items` with a tqdm bar when `show` (with items None: a bar to update by hand, or a silent stand-in)."""
    from tqdm import tqdm

    if items is None:
        return tqdm(total=total, desc=desc, unit=unit, disable=not show)
    return tqdm(items, desc=desc, unit=unit) if show else items
