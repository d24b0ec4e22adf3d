"""Training data: samples -> audio hashes and Whisper labels; encoder outputs and teacher transcripts cached on disk.

Labels follow Hugging Face Whisper training: the decoder reads the prefix (SOT, language and task for
multilingual models, no-timestamps) followed by the text, and is trained to predict the text and EOT;
prefix positions and padding carry -100.

The encoder-output cache holds one float16 file per clip, keyed by the hash of the decoded 16 kHz audio
and a fingerprint of the encoder weights, so a frozen encoder runs once per clip for any number of epochs,
runs and arms (the compressed model, its control and the teacher share it when their encoders are equal).
It lives under the user cache (`~/.cache/slimwhisper/encoder-outputs`, `$SLIMWHISPER_CACHE` moves it) and
not inside the output directory: entries are content-addressed, so every recipe trained on the same data
(e.g. a sweep over compression ratios) reuses them, and deleting a run never throws them away.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..audio import SAMPLE_RATE
from ..data import Dataset, Sample, SkipReport, iter_audio, load_sample_audio, open_dataset
from ..decoding import text_decoder
from ..errors import SlimWhisperError
from ..loading.cache import cache_root
from ..tokens import TokenIds, decoder_prompt
from .losses import IGNORE_INDEX

CACHE_FORMAT = 1  # bump when the stored layout changes


@dataclass(frozen=True)
class TrainItem:
    """One training utterance: where its audio is, its content hash, and its decoder inputs / labels."""

    sample: Sample
    audio_hash: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def audio_hash(audio: np.ndarray) -> str:
    """Content hash of decoded 16 kHz float32 audio (the same sound in another container hashes the same)."""
    return hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()[:32]


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every tensor (exact bytes) and module class of `module`: equal fingerprints mean equal outputs."""
    digest = hashlib.sha256(f"format{CACHE_FORMAT}".encode())
    for name, sub in module.named_modules():
        digest.update(f"{name}:{type(sub).__name__}\n".encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        digest.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:24]


def prefix_ids(model: Any, language: str | None) -> list[int]:
    """Decoder prefix: [SOT, <|lang|>, <|transcribe|>, <|notimestamps|>], or [SOT, <|notimestamps|>] for .en models."""
    ids = TokenIds.from_generation_config(model.generation_config)
    if ids.multilingual and language is None:
        raise SlimWhisperError(
            "a multilingual model needs each sample's language for its prefix; give it in the manifest "
            "('lang') or pass --language"
        )
    return decoder_prompt(ids, ids.language_id(language) if ids.multilingual else None)


def make_labels(prefix: Sequence[int], text_ids: Sequence[int], eot: int, max_tokens: int) -> tuple[list, list]:
    """(decoder inputs, labels) of equal length: inputs = prefix + text, labels = -100s + text + EOT."""
    text = list(text_ids)[: max(0, max_tokens - len(prefix))]
    inputs = list(prefix) + text
    labels = [IGNORE_INDEX] * (len(prefix) - 1) + text + [eot]
    return inputs, labels


def collate(items: Sequence[TrainItem], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded decoder inputs [B, L] (pad_id) and labels [B, L] (-100); causal attention ignores the tail."""
    length = max(len(it.input_ids) for it in items)
    inputs = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        inputs[row, : len(it.input_ids)] = torch.tensor(it.input_ids)
        labels[row, : len(it.labels)] = torch.tensor(it.labels)
    return inputs, labels


def looks_normalised(texts: Sequence[str], share: float = 0.9) -> bool:
    """Whether references were written without case and punctuation (as LibriSpeech-style corpora are).

    Cross-entropy on such references teaches the model to write that way too (its transcripts lose
    capitals and punctuation); the normalised WER hides it, users do not.
    """
    texts = [t for t in texts if any(ch.isalpha() for ch in t)]
    if not texts:
        return False
    flat = sum(1 for t in texts if t == t.lower() or t == t.upper()) / len(texts)
    bare = sum(1 for t in texts if not any(ch in ".,?!;:" for ch in t)) / len(texts)
    return flat >= share and bare >= share


def open_train_data(data: str | os.PathLike | Dataset | Sequence[Sample] | Sequence[str | os.PathLike],
                    ) -> tuple[list[Sample], SkipReport, str]:
    """Samples, skip report and a source label from a path (anything `open_dataset` reads), several paths
    (their samples mixed into one set; an id that repeats gets its source's number as a prefix) or samples."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        samples, report, labels, seen = [], SkipReport(), [], set()
        for i, part in enumerate(data):
            part_samples, part_report, label = open_train_data(part)
            for s in part_samples:
                samples.append(s if s.id not in seen else replace(s, id=f"{i}:{s.id}"))
                seen.add(samples[-1].id)
            report.extend(part_report)
            labels.append(label)
        return samples, report, " + ".join(labels)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.exists():
            raise SlimWhisperError(f"training data {path} does not exist; give a manifest.jsonl or dataset folder")
        data = open_dataset(path)
    if isinstance(data, Dataset):
        return list(data.samples), data.report, str(data.source)
    return list(data), SkipReport(), "samples"


def hash_samples(samples: Iterable[Sample], report: SkipReport, progress: bool = False) -> list[tuple[Sample, str]]:
    """Decode each clip once to hash it; clips over 30 s (one window) and unreadable ones go to `report`."""
    from tqdm.auto import tqdm

    samples = list(samples)
    pairs = iter_audio(samples, report=report, on_long="skip")
    return [(s, audio_hash(a)) for s, a in tqdm(pairs, total=len(samples), desc="hash audio", disable=not progress)]


def build_items(
    pairs: Sequence[tuple[Sample, str]], model: Any, tokenizer: Any, texts: dict[str, str] | None,
    language: str | None, max_tokens: int,
) -> list[TrainItem]:
    """Tokenised training items; `texts` (audio hash -> transcript) replaces the references when given."""
    eot = TokenIds.from_generation_config(model.generation_config).eot
    max_tokens = min(max_tokens, int(getattr(model.config, "max_target_positions", max_tokens)))  # decoder length
    items = []
    for sample, key in pairs:
        text = (texts[key] if texts is not None else sample.text).strip()
        ids = tokenizer.encode(" " + text, add_special_tokens=False) if text else []
        prefix = prefix_ids(model, sample.language or language)
        inputs, labels = make_labels(prefix, ids, eot, max_tokens)
        items.append(TrainItem(sample, key, tuple(inputs), tuple(labels)))
    if not items:
        raise SlimWhisperError("no usable training utterances (all were skipped: missing, unreadable or over 30 s)")
    return items


def default_cache_dir() -> Path:
    return cache_root() / "encoder-outputs"


STALE_TMP_SECONDS = 3600  # older than any write: a run killed mid-write left it


def sweep_stale_tmp(folder: Path) -> None:
    """Remove `*.tmp-*` files a killed run left mid-write (they never sit under a final name, but take space)."""
    now = time.time()
    for tmp in folder.glob("*/*.tmp-*") if folder.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:  # another process removed or is finishing it
            pass


class EncoderCache:
    """float16 encoder outputs on disk: `<root>/<encoder fingerprint>/<hash[:2]>/<hash>.pt`, written atomically."""

    def __init__(self, root: str | os.PathLike | None, fingerprint: str):
        self.dir = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dir = self.dir / fingerprint
        self.fingerprint = fingerprint
        sweep_stale_tmp(self.dir)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError):  # a damaged entry is recomputed, not fatal
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, hidden: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        torch.save(hidden.detach().to("cpu", torch.float16).contiguous().clone(), tmp)
        os.replace(tmp, path)


def log_mel(feature_extractor: Any, audios: Sequence[np.ndarray], device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """Whisper's log-mel features [B, n_mels, 3000] of 16 kHz clips (each padded to 30 s)."""
    feats = feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return feats.input_features.to(device=device, dtype=dtype)


@torch.inference_mode()
def fill_encoder_cache(
    model: Any, feature_extractor: Any, items: Sequence[TrainItem], cache: EncoderCache, *,
    batch_size: int = 8, progress: bool = True, layers: bool = False,
) -> int:
    """Run the encoder on every clip missing from `cache`; returns how many were computed.

    `layers`: store every layer's output [L, T, d] (the last after the final layer norm, i.e. the
    encoder's output) instead of the output alone, for layer-wise distillation."""
    from tqdm.auto import tqdm

    todo = {it.audio_hash: it.sample for it in items if not cache.has(it.audio_hash)}
    todo_items = list(todo.items())
    param = next(model.parameters())
    encoder = model.get_encoder()
    for start in tqdm(range(0, len(todo_items), batch_size), desc="encoder outputs", unit="batch",
                      disable=not progress or not todo_items):
        chunk = todo_items[start : start + batch_size]
        audios = [load_sample_audio(s, on_long="error") for _, s in chunk]
        out = encoder(log_mel(feature_extractor, audios, param.device, param.dtype), output_hidden_states=layers)
        hidden = layer_states(out.hidden_states) if layers else out.last_hidden_state
        for (key, _), h in zip(chunk, hidden):
            cache.put(key, h)
    return len(todo_items)


def layer_states(hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, L, T, d]: each encoder layer's output from HF's `hidden_states` (the input embedding, the outputs
    of layers 1..L-1, then the final layer-normed output), the embedding left out."""
    return torch.stack(tuple(hidden_states[1:]), dim=1)


def load_encoder_outputs(cache: EncoderCache, items: Sequence[TrainItem]) -> torch.Tensor:
    """Stacked cached encoder outputs [B, 1500, d] (or [B, L, 1500, d] for a layers cache; float16, CPU)."""
    hidden = [cache.get(it.audio_hash) for it in items]
    if any(h is None for h in hidden):
        raise SlimWhisperError(f"encoder cache {cache.dir} lost entries during training; run again to recompute")
    return torch.stack(hidden)


def teacher_transcripts(
    teacher: Any, processor: Any, pairs: Sequence[tuple[Sample, str]], root: str | os.PathLike | None,
    language: str | None, *, batch_size: int = 8, progress: bool = True,
) -> dict[str, str]:
    """The teacher's greedy transcript of each clip (label-free targets), cached per teacher in one JSON file."""
    from tqdm.auto import tqdm

    base = Path(root).expanduser() if root is not None else default_cache_dir()
    path = base / "transcripts" / f"{weights_fingerprint(teacher)}-engine.json"  # the engine's texts
    known: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    todo = [(s, k) for s, k in pairs if k not in known]
    decode = text_decoder(teacher, processor, batch_size=batch_size) if todo else None
    for start in tqdm(range(0, len(todo), batch_size), desc="teacher transcripts", disable=not progress or not todo):
        chunk = todo[start : start + batch_size]
        for lang in {s.language or language for s, _ in chunk}:
            part = [(s, k) for s, k in chunk if (s.language or language) == lang]
            audios = [load_sample_audio(s, on_long="error") for s, _ in part]
            texts = decode(audios, lang)
            known.update({k: t for (_, k), t in zip(part, texts)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(known, ensure_ascii=False))
        os.replace(tmp, path)
    return {k: known[k] for _, k in pairs}


TopK = tuple[torch.Tensor, torch.Tensor]  # teacher's top-k token ids (int32) and log-probs (float32), [L, k] each


def item_key(item: TrainItem) -> str:
    """Identity of one teacher input: the clip and the decoder tokens it reads."""
    return hashlib.sha1(f"{item.audio_hash}:{item.input_ids}".encode()).hexdigest()


@torch.inference_mode()
def softened_topk(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """(indices, log-probabilities) of the k most likely tokens of the softened distribution: the distillation
    target, whether cached once (`teacher_topk`) or computed live on altered audio."""
    values, idx = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
    return idx, values


def teacher_topk(
    teacher: Any, items: Sequence[TrainItem], encoder_cache: EncoderCache, *, k: int, temperature: float,
    root: str | os.PathLike | None, pad_id: int, batch_size: int = 8, progress: bool = True,
) -> dict[str, TopK]:
    """The teacher's top-k softened log-probabilities at every position of every item, computed once and cached.

    The teacher is frozen and its inputs (encoder output, decoder tokens) are fixed per item, so its
    distillation targets never change: one pass here replaces a teacher forward in every training step.
    The log-probs stay float32: rounded to float16 they differ from what the unchanged original computes
    by ~1e-3, a gradient that Adam scales up to full-size steps, so a control trained on distillation
    alone walked away from the original on rounding noise.
    """
    from tqdm.auto import tqdm
    from transformers.modeling_outputs import BaseModelOutput

    base = Path(root).expanduser() if root is not None else default_cache_dir()
    path = base / "teacher-topk" / f"{weights_fingerprint(teacher)}-k{k}-T{temperature:g}-f32.pt"
    known: dict[str, TopK] = torch.load(path, weights_only=True) if path.is_file() else {}
    todo = list({item_key(it): it for it in items if item_key(it) not in known}.values())
    device = next(teacher.parameters()).device
    for start in tqdm(range(0, len(todo), batch_size), desc="teacher targets", disable=not progress or not todo):
        chunk = todo[start : start + batch_size]
        hidden = load_encoder_outputs(encoder_cache, chunk).to(device, torch.float32)
        inputs, _ = collate(chunk, pad_id)
        logits = teacher(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                         decoder_input_ids=inputs.to(device)).logits
        idx, values = softened_topk(logits, k, temperature)  # (B, L, k)
        for row, it in enumerate(chunk):
            n = len(it.input_ids)
            known[item_key(it)] = (idx[row, :n].to("cpu", torch.int32), values[row, :n].to("cpu", torch.float32))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        torch.save(known, tmp)
        os.replace(tmp, path)
    return {item_key(it): known[item_key(it)] for it in items}


def collate_topk(items: Sequence[TrainItem], targets: dict[str, TopK]) -> TopK:
    """Right-padded teacher targets [B, L, k] aligned with `collate` (padding positions carry no label)."""
    rows = [targets[item_key(it)] for it in items]
    length, k = max(len(it.input_ids) for it in items), rows[0][0].shape[-1]
    idx = torch.zeros(len(items), length, k, dtype=torch.int32)
    logp = torch.zeros(len(items), length, k, dtype=torch.float32)
    for r, (i, v) in enumerate(rows):
        idx[r, : i.shape[0]], logp[r, : v.shape[0]] = i, v
    return idx, logp
