"""`finetune`: the training loop (Accelerate for devices, mixed precision and multi-process runs).

One optimizer step = `batch_size` utterances, drawn in a fixed order (a seeded permutation per epoch, a
pure function of the step), split over processes and micro-batches. Checkpoints hold the trainable
tensors, the optimizer, the RNG states and the step; the data order and the learning rate are functions
of the step, so a resumed run takes exactly the same steps as an uninterrupted one.
Each step's loss is normalised by the labelled tokens of the whole step, so any number of processes and
micro-batches gives the gradient of one process holding the whole batch.
Only the main process writes files (cache, log, checkpoints); every file is written atomically, so a run
killed at any point (SIGKILL included) resumes to the uninterrupted result.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..data import load_sample_audio
from ..data.records import SkipReport
from ..errors import SlimWhisperError
from ..lowrank.calibrate import audio_frames, frame_weights
from .augment import channel_rng, play_through_channel
from .config import FinetuneConfig
from .data import (
    EncoderCache,
    TopK,
    TrainItem,
    build_items,
    collate,
    collate_topk,
    fill_encoder_cache,
    hash_samples,
    layer_states,
    load_encoder_outputs,
    log_mel,
    looks_normalised,
    open_train_data,
    softened_topk,
    teacher_topk,
    teacher_transcripts,
    weights_fingerprint,
)
from .losses import IGNORE_INDEX, combined_loss, encoder_distillation, lr_factor

LOG_FIELDS = ("step", "lr", "loss", "ce", "kd", "enc", "skipped", "time")
logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
# Test hook only: seconds to pause inside each checkpoint write, so a test can SIGKILL a run mid-write.
SLOW_CHECKPOINT_ENV = "SLIMWHISPER_TEST_SLOW_CHECKPOINT"


@dataclass
class TrainResult:
    """What a `finetune` call did; `steps_done < config.steps` only when stopped early (`stop_after`)."""

    steps_done: int
    wall_seconds: float
    resumed_from: int
    trainable_parameters: int
    n_train: int
    skipped: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)  # the last logged row
    encoder_cached: bool = True
    processes: int = 1  # processes that shared each step (1 unless launched by accelerate / torchrun)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def converted_paths(config: Any) -> tuple[str, ...]:
    """Module paths the compression replaced (MLA attention, low-rank linears), from `config.compression`."""
    compression = getattr(config, "compression", None) or {}
    paths = [name for spec in compression.values() if isinstance(spec, dict) for name in spec.get("layers", {})]
    return tuple(sorted(paths))


def check_encoder_weight(config: FinetuneConfig, paths: Sequence[str]) -> None:
    """Refuse encoder distillation when the scope trains no encoder parameter (before any data or teacher work)."""
    trains_encoder = config.scope == "all" or (config.scope == "converted"
                                               and any(p.startswith("model.encoder.") for p in paths))
    if config.encoder_weight > 0 and not trains_encoder:
        raise SlimWhisperError("--encoder-weight distils the encoder, but no encoder parameter is trained; "
                               "use --scope converted (a low-rank encoder) or --scope all, or --encoder-weight 0")


EMBEDDINGS = ("embed_tokens", "embed_positions")


def is_embedding(name: str) -> bool:
    """A token or position embedding (the decoder's token embedding is also its output projection)."""
    return any(part in EMBEDDINGS for part in name.split("."))


def select_trainable(model: nn.Module, scope: str, paths: Sequence[str] = (), embeddings: bool = False) -> list[str]:
    """Set `requires_grad` for `scope` ("converted" = the modules under `paths`) and return the trained names.

    Embeddings stay frozen unless `embeddings`: the tied token embedding is most of a small decoder's
    parameters, and a few hundred utterances move every row of it.
    """
    names = [n for n, _ in model.named_parameters()]
    if scope == "all":
        chosen = set(names)
    elif scope == "decoder":
        chosen = {n for n in names if n.startswith("model.decoder.")}
    else:
        if not paths:
            raise SlimWhisperError(
                "the model has no converted modules to train (its config records no compression); "
                "use --scope decoder or --scope all"
            )
        missing = [p for p in paths if not any(n.startswith(p + ".") for n in names)]
        if missing:
            raise SlimWhisperError(f"the model has no modules {missing[:3]}; it does not match the converted one")
        chosen = {n for n in names if n.startswith(tuple(p + "." for p in paths))}
    if not embeddings:
        chosen = {n for n in chosen if not is_embedding(n)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def unshare(model: nn.Module, teacher: nn.Module) -> int:
    """Give trainable parameters that share storage with the teacher their own copy; returns how many.

    `slimwhisper.convert` returns a model that owns its tensors, but a model assembled by other code
    around the teacher's tensors would otherwise silently train the teacher too.
    """
    theirs = {t.data_ptr() for t in teacher.state_dict().values()}
    copied = 0
    for param in model.parameters():
        if param.requires_grad and param.data_ptr() in theirs:
            param.data = param.data.clone()
            copied += 1
    return copied


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step `step`: consecutive slices of per-epoch seeded permutations."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[offset]))
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(work_dir: Path, step: int, model: nn.Module, names: Sequence[str], optimizer: Any,
                    meta: dict) -> None:
    """Atomically replace `work_dir/checkpoint` (trainable tensors, optimizer, RNG, step, run identity)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tmp, final, old = (work_dir / f"{CHECKPOINT}{suffix}" for suffix in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(tmp / "trainable.safetensors"))
    _test_pause()  # test hook: a kill here leaves a half-written checkpoint.tmp
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    shutil.rmtree(old, ignore_errors=True)  # os.replace cannot move a folder onto a non-empty one
    if final.exists():
        os.replace(final, old)
        _test_pause()  # test hook: a kill here leaves only checkpoint.old and the finished checkpoint.tmp
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _test_pause() -> None:
    """Test hook (SLIMWHISPER_TEST_SLOW_CHECKPOINT=seconds): widen the checkpoint write so a kill can land in it."""
    seconds = float(os.environ.get(SLOW_CHECKPOINT_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def settle_checkpoint(work_dir: Path) -> None:
    """Repair what a kill inside `save_checkpoint` left: the previous checkpoint comes back from `.old` when the
    rename of the new one did not happen; a half-written `.tmp` is dropped (its steps are redone)."""
    final, old, tmp = (work_dir / f"{CHECKPOINT}{suffix}" for suffix in ("", ".old", ".tmp"))
    if not final.exists() and (old / "state.json").is_file():
        os.replace(old, final)  # killed between the two renames: `.old` is the last complete checkpoint
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(work_dir: Path, model: nn.Module, optimizer: Any, meta: dict) -> int:
    """Restore a checkpoint written for the same run (config, data, trainable set); returns its step, 0 if none."""
    from safetensors.torch import load_file

    ckpt = work_dir / CHECKPOINT
    if not (ckpt / "state.json").is_file():
        return 0
    saved = json.loads((ckpt / "state.json").read_text())
    for key in ("config", "data_fingerprint", "trainable"):
        if saved.get(key) != meta.get(key):
            raise SlimWhisperError(
                f"{work_dir} holds a checkpoint of another run (its {key} differs); use another --out or --overwrite"
            )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(ckpt / "trainable.safetensors")).items():
            params[name].copy_(tensor)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(saved["step"])


class LossLog:
    """CSV of one row per step, appended and flushed as training goes; a resume drops rows past the checkpoint
    (they are trained again), so every step appears once."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.last: dict = {}  # the last row kept, so a resumed run that has no step left still reports it
        if not enabled:
            return
        rows = []
        if resume_step and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        self.last = {k: (int(v) if k == "step" else float(v)) for k, v in rows[-1].items()} if rows else {}
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:  # a kill while rewriting must not lose the kept rows
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def append(self, row: dict) -> None:
        self.last = row
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)


@dataclass
class _Sources:
    """Where each micro-batch's encoder states and distillation targets come from."""

    student: EncoderCache | None  # None: the student's encoder is trained, so it runs every step
    teacher: dict[str, TopK] | None  # item key -> the teacher's top-k log-probs
    feature_extractor: Any
    teacher_states: EncoderCache | None = None  # the teacher's encoder outputs, for encoder distillation
    live_teacher: nn.Module | None = None  # with `augment`, the teacher runs on each step's altered clips instead


def _prepare_sources(model, teacher, processor, items, config, cache_dir, accelerator, pad_id, progress) -> _Sources:
    """Fill the encoder caches and the teacher's targets (main process first; the others then read them)."""
    if config.augment > 0:  # every step's audio is new: nothing to cache, the teacher runs alongside
        return _Sources(None, None, processor.feature_extractor, live_teacher=teacher)
    student_net = accelerator.unwrap_model(model)  # DDP wraps the model in multi-process runs
    encoder_trained = any(p.requires_grad for p in student_net.get_encoder().parameters())
    student_cache = teacher_cache = layers_cache = None
    targets = None
    for turn in ("main", "others"):
        if accelerator.is_main_process == (turn == "main"):
            if not encoder_trained:
                student_cache = EncoderCache(cache_dir, weights_fingerprint(student_net.get_encoder()))
                fill_encoder_cache(student_net, processor.feature_extractor, items, student_cache,
                                   batch_size=config.micro_batch_size, progress=progress)
            if teacher is not None and (config.kd_weight > 0 or config.encoder_weight > 0):
                fp = weights_fingerprint(teacher.get_encoder())
                same = student_cache is not None and student_cache.fingerprint == fp
                teacher_cache = student_cache if same else EncoderCache(cache_dir, fp)
                fill_encoder_cache(teacher, processor.feature_extractor, items, teacher_cache,
                                   batch_size=config.micro_batch_size, progress=progress)
            if teacher is not None and config.kd_weight > 0:
                targets = teacher_topk(teacher, items, teacher_cache, k=config.kd_top_k,
                                       temperature=config.temperature, root=cache_dir, pad_id=pad_id,
                                       batch_size=config.micro_batch_size, progress=progress)
            if teacher is not None and config.encoder_weight > 0 and config.encoder_layers == "all":
                layers_cache = EncoderCache(cache_dir, teacher_cache.fingerprint + "-layers")
                fill_encoder_cache(teacher, processor.feature_extractor, items, layers_cache,
                                   batch_size=config.micro_batch_size, progress=progress, layers=True)
        accelerator.wait_for_everyone()
    states = None
    if teacher is not None and config.encoder_weight > 0:
        states = layers_cache if layers_cache is not None else teacher_cache
    return _Sources(student_cache, targets, processor.feature_extractor, states)


def _micro_step(model, batch: list[TrainItem], sources: _Sources, config: FinetuneConfig, accelerator,
                pad_id: int, tokens: int, draws: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """(loss, ce, kd, enc) of one micro-batch as its share of the step's: token sums over the step's `tokens`,
    encoder distillation summed over utterances and divided by the step's `batch_size`. `draws`: (step, item
    index) of each utterance, which seeds its recording channel when `config.augment` is on."""
    device = accelerator.device
    inputs, labels = collate(batch, pad_id)
    inputs, labels = inputs.to(device), labels.to(device)
    layers = config.encoder_weight > 0 and config.encoder_layers == "all"
    topk = target = weights = None
    if sources.student is not None:
        hidden = load_encoder_outputs(sources.student, batch).to(device, torch.float32)
        student_kwargs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
    else:
        audios = [_channel(load_sample_audio(it.sample, on_long="error"), config, draw)
                  for it, draw in zip(batch, draws)]
        student_kwargs = {"input_features": log_mel(sources.feature_extractor, audios, device, torch.float32)}
        if config.encoder_weight > 0:
            frames = student_kwargs["input_features"].shape[-1] // 2  # the encoder halves the mel frames
            weights = frame_weights([audio_frames(len(a), frames) for a in audios], config.encoder_audio_weight,
                                    frames)
    if sources.live_teacher is not None:
        topk, target = _live_targets(sources.live_teacher, student_kwargs["input_features"], inputs, config, layers)
    elif sources.teacher is not None:
        idx, logp = collate_topk(batch, sources.teacher)
        topk = (idx.to(device), logp.to(device))
    with accelerator.autocast():
        out = model(decoder_input_ids=inputs, output_hidden_states=layers, **student_kwargs)
    loss, ce, kd = combined_loss(out.logits, labels, topk, ce_weight=config.ce_weight, kd_weight=config.kd_weight,
                                 temperature=config.temperature, tokens=tokens)
    if config.encoder_weight == 0 or (target is None and sources.teacher_states is None):
        return loss, ce, kd, kd.detach() * 0.0
    if target is None:
        target = load_encoder_outputs(sources.teacher_states, batch).to(device, torch.float32)
    student = layer_states(out.encoder_hidden_states) if layers else out.encoder_last_hidden_state
    enc = encoder_distillation(student, target, weights) / config.batch_size
    return loss + config.encoder_weight * enc, ce, kd, enc


def _channel(audio: np.ndarray, config: FinetuneConfig, draw: tuple[int, int]) -> np.ndarray:
    """The clip as this step plays it: through a random recording channel for a share `augment` of the draws."""
    if config.augment == 0:
        return audio
    rng = channel_rng(config.seed, *draw)
    return play_through_channel(audio, rng) if rng.random() < config.augment else audio


@torch.no_grad()
def _live_targets(teacher: nn.Module, features: torch.Tensor, inputs: torch.Tensor, config: FinetuneConfig,
                  layers: bool) -> tuple[TopK | None, torch.Tensor | None]:
    """The teacher's top-k softened log-probs and encoder states on this micro-batch's own (altered) audio:
    what `teacher_topk` and the encoder cache give for audio that is fixed."""
    out = teacher(input_features=features, decoder_input_ids=inputs, output_hidden_states=layers)
    topk = None
    if config.kd_weight > 0:
        topk = softened_topk(out.logits, config.kd_top_k, config.temperature)
    states = layer_states(out.encoder_hidden_states) if layers else out.encoder_last_hidden_state
    return topk, states.float()


def labelled_tokens(items: Sequence[TrainItem]) -> int:
    """Positions that carry a loss (every item has at least its EOT)."""
    return sum(sum(1 for t in it.labels if t != IGNORE_INDEX) for it in items)


def skips(loss: float, min_loss: float) -> bool:
    """Whether a step's loss is rounding rather than signal (a rounded KL can be slightly negative); 0 never skips."""
    return abs(loss) < min_loss


def _train_step(model, optimizer, params, items: Sequence[TrainItem], step: int, sources: _Sources,
                config: FinetuneConfig, accelerator, pad_id: int) -> torch.Tensor:
    """One optimizer step over this process's share of the step's batch, skipped when the step's loss is below
    `min_loss` (rounding, not signal); returns the whole step's (loss, ce, kd, enc), summed over processes."""
    world = accelerator.num_processes
    batch = batch_indices(step, config.batch_size, len(items), config.seed)
    tokens = labelled_tokens([items[j] for j in batch])  # every process knows the whole batch: no all-reduce
    mine = batch[accelerator.process_index::world]
    micro = [mine[i : i + config.micro_batch_size] for i in range(0, len(mine), config.micro_batch_size)]
    totals = torch.zeros(4, device=accelerator.device)
    whole = world == 1 and len(micro) == 1  # this forward is the whole step: its loss is known before backward
    for i, idx in enumerate(micro):
        with accelerator.no_sync(model) if i < len(micro) - 1 else nullcontext():  # sync on the last only
            parts = _micro_step(model, [items[j] for j in idx], sources, config, accelerator, pad_id, tokens,
                                [(step, j) for j in idx])
            if not (whole and skips(float(parts[0].detach()), config.min_loss)):  # a skipped step needs no gradient
                accelerator.backward(parts[0] * world)  # DDP averages over processes; the step's loss is their sum
        totals += torch.stack([p.detach() for p in parts])
    totals = accelerator.reduce(totals, reduction="sum")  # every process decides on the whole step's loss
    if not skips(float(totals[0]), config.min_loss):
        if config.clip_norm > 0:
            accelerator.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def finetune(
    model: nn.Module,
    train_data: Any,
    config: FinetuneConfig | None = None,
    *,
    processor: Any,
    teacher: nn.Module | None = None,
    scope_paths: Sequence[str] | None = None,
    work_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune `model` in place on `train_data` as `config` says; resumable from `work_dir`.

    Args:
        model: a (compressed) Whisper; its trainable scope is set here, the rest is frozen.
        train_data: anything `open_dataset` reads (path), a `Dataset`, or a list of `Sample`s.
        config: the recipe (default `FinetuneConfig()`, the documented recipe).
        processor: the model's WhisperProcessor (tokenizer for labels, feature extractor for audio).
        teacher: the uncompressed original, needed when `config.kd_weight > 0` or `config.label_free`.
        scope_paths: module paths for scope "converted" (default: the ones `model.config.compression`
            lists); pass the compressed model's paths when training its uncompressed control.
        work_dir: checkpoints and loss.csv go here; a run finds its checkpoint and resumes.
        cache_dir: root of the encoder-output cache (default ~/.cache/slimwhisper/encoder-outputs).
        device: "cpu", "cuda", ... (default: Accelerate's choice, the GPU when there is one).
        stop_after: stop (with a checkpoint) after this step, as a time budget or a simulated kill.

    Returns:
        A `TrainResult`; the trained weights are in `model`.
    """
    config = config if config is not None else FinetuneConfig()
    check_encoder_weight(config, tuple(scope_paths) if scope_paths is not None else converted_paths(model.config))
    accelerator = _make_accelerator(config, teacher, device)
    main = accelerator.is_main_process
    torch.manual_seed(config.seed)
    work = _work_dir(work_dir, main)
    items, report, source = _train_items(model, train_data, config, processor, teacher, cache_dir, accelerator,
                                         progress)
    run, start = _prepare_run(model, teacher, processor, items, config, scope_paths, cache_dir, accelerator, work,
                              progress and main)
    log = LossLog(work / "loss.csv", start, main) if work is not None else None
    elapsed = _previous_seconds(work, start)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    last, wall = _run_steps(run, start, end, elapsed, log, progress and main)
    return TrainResult(steps_done=max(end, start), wall_seconds=wall, resumed_from=start,
                       trainable_parameters=sum(p.numel() for p in run.params), n_train=len(items),
                       skipped=report.to_dict() | {"source": source}, last=last or (log.last if log else {}),
                       encoder_cached=run.sources.student is not None, processes=accelerator.num_processes)


def _make_accelerator(config: FinetuneConfig, teacher: nn.Module | None, device: str | None) -> Any:
    """The run's Accelerator, after refusing a missing teacher or a batch that does not split over the processes."""
    from accelerate import Accelerator

    if config.needs_teacher and teacher is None:
        raise SlimWhisperError("distillation and label-free training need the original model as teacher")
    cpu = on_cpu(device)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else config.mixed_precision)
    world = accelerator.num_processes
    if config.batch_size % world:  # equal shares: every process runs the same number of synced steps
        raise SlimWhisperError(f"--batch-size {config.batch_size} does not split over {world} processes; "
                               f"give a multiple of {world}")
    return accelerator


def on_cpu(device: str | None) -> bool:
    """Whether to train on the CPU (asked for, or no GPU). It also picks the process group (gloo), and accelerate
    sets that up once, for the first caller: whoever asks first must pass the same answer."""
    return device == "cpu" or (device is None and not torch.cuda.is_available())


def _work_dir(work_dir: str | os.PathLike | None, main: bool) -> Path | None:
    """`work_dir` as a Path, created by the main process only (the only one that writes files)."""
    work = Path(work_dir) if work_dir is not None else None
    if work is not None and main:
        work.mkdir(parents=True, exist_ok=True)
    return work


def _train_items(model: nn.Module, train_data: Any, config: FinetuneConfig, processor: Any,
                 teacher: nn.Module | None, cache_dir: str | os.PathLike | None, accelerator: Any,
                 progress: bool) -> tuple[list[TrainItem], SkipReport, str]:
    """The tokenised training items (labels from the references, or the teacher's transcripts when label-free),
    the skip report and the data's source."""
    main = accelerator.is_main_process
    samples, report, source = open_train_data(train_data)
    if main and not config.label_free and config.ce_weight > 0 and looks_normalised([x.text for x in samples]):
        logger.warning("the training references have no case or punctuation: cross-entropy on them makes the model "
                    "write that way; the default --label-free (the original's transcripts as targets) keeps its style")
    pairs = hash_samples(samples, report, progress=progress and main)
    texts = None
    if config.label_free:
        teacher.to(accelerator.device)
        with accelerator.main_process_first():  # the others read the main process's cached transcripts
            texts = teacher_transcripts(teacher, processor, pairs, cache_dir, config.language,
                                        batch_size=config.micro_batch_size, progress=progress and main)
    items = build_items(pairs, model, processor.tokenizer, texts, config.language, config.max_label_tokens)
    return items, report, source


def _trainable_setup(model: nn.Module, teacher: nn.Module | None, config: FinetuneConfig,
                     scope_paths: Sequence[str] | None, accelerator: Any) -> tuple[list[str], list[nn.Parameter], Any]:
    """Freeze all but the trained scope (the teacher entirely); returns the trained names, parameters and optimizer."""
    paths = tuple(scope_paths) if scope_paths is not None else converted_paths(model.config)
    names = select_trainable(model, config.scope, paths, config.embeddings)
    model.eval()  # dropout and layerdrop off (Whisper has none); gradients flow in eval mode
    if teacher is not None:
        unshare(model, teacher)
        teacher.eval().requires_grad_(False).to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    return names, params, optimizer


@dataclass
class _Run:
    """What every optimizer step needs, gathered once so the step loop stays readable."""

    model: Any  # as prepared by Accelerate
    optimizer: Any
    params: list[nn.Parameter]
    items: list[TrainItem]
    sources: _Sources
    config: FinetuneConfig
    accelerator: Any
    pad_id: int
    names: list[str]  # the trained parameters, as checkpoints store them
    meta: dict  # the run's identity, stored with every checkpoint
    work: Path | None


def _prepare_run(model: nn.Module, teacher: nn.Module | None, processor: Any, items: list[TrainItem],
                 config: FinetuneConfig, scope_paths: Sequence[str] | None, cache_dir: str | os.PathLike | None,
                 accelerator: Any, work: Path | None, progress: bool) -> tuple[_Run, int]:
    """Trainable scope, optimizer, restored checkpoint and cached encoder states/targets; returns them and the
    step to start from (0 unless a checkpoint was found)."""
    names, params, optimizer = _trainable_setup(model, teacher, config, scope_paths, accelerator)
    model.to(accelerator.device)
    meta = {"config": config.to_dict(), "trainable": names, "data_fingerprint": data_fingerprint(items)}
    if work is not None and accelerator.is_main_process:
        settle_checkpoint(work)
    accelerator.wait_for_everyone()  # every process then reads the same checkpoint
    start = load_checkpoint(work, model, optimizer, meta) if work is not None else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sources = _prepare_sources(model, teacher, processor, items, config, cache_dir, accelerator, pad_id, progress)
    return _Run(model, optimizer, params, items, sources, config, accelerator, pad_id, names, meta, work), start


def _run_steps(run: _Run, start: int, end: int, elapsed: float, log: LossLog | None,
               progress: bool) -> tuple[dict, float]:
    """Train steps `start` to `end`, logging each and checkpointing every `checkpoint_every` and at `end`;
    returns the last log row (empty when no step ran) and the wall seconds, interrupted earlier runs included."""
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    main = accelerator.is_main_process
    t0 = time.perf_counter()
    last: dict = {}
    bar = tqdm(total=config.steps, initial=start, desc="finetune", unit="step", disable=not progress)
    for step in range(start, end):
        last = _logged_step(run, step, elapsed, t0)
        if log is not None:
            log.append(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
        done = step + 1
        if run.work is not None and main and (done % config.checkpoint_every == 0 or done == end):
            save_checkpoint(run.work, done, accelerator.unwrap_model(run.model), run.names, run.optimizer,
                            {**run.meta, "seconds": elapsed + time.perf_counter() - t0})
        accelerator.wait_for_everyone()
    bar.close()
    return last, elapsed + time.perf_counter() - t0


def _logged_step(run: _Run, step: int, elapsed: float, t0: float) -> dict:
    """One optimizer step at the schedule's learning rate; returns its log row (the losses of the whole batch)."""
    config = run.config
    lr = config.lr * lr_factor(step, config.steps, config.warmup, config.schedule, config.min_lr_ratio,
                               config.decay_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    totals = _train_step(run.model, run.optimizer, run.params, run.items, step, run.sources, config,
                         run.accelerator, run.pad_id)
    return {"step": step + 1, "lr": lr, "loss": float(totals[0]), "ce": float(totals[1]), "kd": float(totals[2]),
            "enc": float(totals[3]), "skipped": int(skips(float(totals[0]), config.min_loss)),
            "time": round(elapsed + time.perf_counter() - t0, 2)}


def data_fingerprint(items: Sequence[TrainItem]) -> str:
    """Identity of the training set (ids, audio hashes, labels), so a checkpoint is never resumed on other data."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{it.sample.id}\0{it.audio_hash}\0{it.input_ids}\0{it.labels}\n".encode())
    return digest.hexdigest()[:24]


def _previous_seconds(work: Path | None, step: int) -> float:
    if work is None or not step:
        return 0.0
    return float(json.loads((work / CHECKPOINT / "state.json").read_text()).get("seconds", 0.0))
