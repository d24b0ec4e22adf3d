"""`recover`: fine-tune a compressed model and, optionally, its identically trained uncompressed control.

Output directory:
    model/          the fine-tuned compressed model (safetensors + processor; loads with `slimwhisper.load`)
    control/        the original model trained with the same recipe, data order and module paths
    finetune.json   config, source, teacher, data, steps, wall times (rewritten after each arm)
    loss.png        loss curves of both arms
    work/<arm>/     checkpoint/ and loss.csv; re-running the same command resumes from here
With validation audio (`--validation`, by default a low-rank encoder's recorded calibration audio) each arm
is read before and after training (`validate.py`) and saved trained only when it ended at least as close to
the original there; otherwise the arm is saved as it was before training, and finetune.json says so.
A finished arm is never retrained; a different recipe in the same directory is an error. Every file is
written atomically (a temporary name, then one rename), so a run killed at any point leaves no half-written
file under a final name, and re-running the same command finishes it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SlimWhisperError
from ..loading.processor import save_processor
from .config import RECORDED_BEFORE, FinetuneConfig
from .train import check_encoder_weight, converted_paths, finetune, on_cpu
from .validate import ValidationSet, distances, validation_set

logger = logging.getLogger(__name__)

RUN_FILE = "finetune.json"
ARMS = ("model", "control")
_TEMPORARY = (f".{RUN_FILE}.tmp", ".loss.png.tmp", *(f".{arm}.partial" for arm in ARMS))  # left by a killed run
_OWNED = (*ARMS, "work", RUN_FILE, "loss.png", *_TEMPORARY)


@dataclass(frozen=True)
class RecoveryJob:
    """One `slimwhisper finetune` invocation."""

    model: str
    train: str | list[str]  # one source, or several mixed into one set
    out: str
    config: FinetuneConfig = FinetuneConfig()
    control: bool = False
    teacher: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    overwrite: bool = False
    progress: bool = True
    validation: str | None = "auto"  # real audio that decides whether a recovery is kept; see validation_source


def recorded(model_path: str, key: str) -> Any:
    """A key of a model directory's saved config.json, read without loading the weights (None when the model is
    a short name or the key is absent): "slimwhisper_source" (its original), "compression" (its recipe)."""
    config = Path(model_path).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get(key)
    return None


def validation_source(validation: str | None, compression: dict | None) -> tuple[str | None, str]:
    """The audio that decides whether each arm's training is kept, and why: a path given, or for "auto" the
    calibration audio a low-rank encoder recorded (when it is still there); None (no check) otherwise."""
    if validation not in (None, "auto", "none"):
        if not Path(validation).expanduser().exists():
            raise SlimWhisperError(f"validation data {validation} does not exist; give a manifest.jsonl or dataset "
                                   "folder of real recordings, or --validation none")
        return str(validation), "given"
    recorded_audio = ((compression or {}).get("lowrank") or {}).get("calibration")
    if validation == "auto" and recorded_audio and Path(recorded_audio).exists():
        return recorded_audio, "the low-rank encoder's calibration audio"
    return None, "none"


def load_teacher(source: dict | None, teacher: str | None, device: str | None) -> tuple[Any, Any, dict]:
    """The original model: `teacher` when given, else rebuilt from the recorded source and checked by sha256."""
    from .. import load

    if teacher is None and not (source and source.get("name")):
        raise SlimWhisperError(
            "the model records no original (config.slimwhisper_source) to distil from or to train as the "
            "control; pass --teacher PATH (the uncompressed model), or --kd-weight 0 without --control"
        )
    model, processor = load(teacher or source["name"], device=device)
    got = (model.config.slimwhisper_source or {}).get("sha256")
    if teacher is None and source.get("sha256") and got != source["sha256"]:
        raise SlimWhisperError(
            f"the original '{source['name']}' on this machine has other weights (sha256 {str(got)[:12]}...) than "
            f"the model was converted from ({source['sha256'][:12]}...); pass the right one with --teacher"
        )
    return model, processor, {"name": teacher or source["name"], "sha256": got, "checked": teacher is None}


def _prepare_out(job: RecoveryJob) -> tuple[Path, dict]:
    """The output directory and the run record; refuses a directory holding another run or other files."""
    out = Path(job.out).expanduser()
    record_path = out / RUN_FILE
    identity = {"model": str(job.model), "train": str(job.train), "config": job.config.to_dict(),
                "control": job.control, "teacher": job.teacher}
    if job.overwrite and out.exists() and _is_main():
        for name in _OWNED:
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    _barrier()  # the other processes look only after the main one has cleared the folder
    try:
        return out, _read_record(out, record_path, identity)
    finally:
        _barrier()  # and nobody writes before every process has looked


def _normalised(identity: dict) -> dict:
    """A saved run identity with its config read through `FinetuneConfig`, so a run recorded before a recipe
    field existed (its value then: `RECORDED_BEFORE`, else today's default) still resumes."""
    from ..errors import SlimWhisperError

    recorded = identity.get("config", {})
    before = dict(RECORDED_BEFORE)
    if not recorded.get("encoder_weight"):  # without encoder distillation its frame weights change nothing
        before.pop("encoder_audio_weight")
    config = {**before, **recorded}
    try:
        return {**identity, "config": FinetuneConfig.from_dict(config).to_dict()}
    except (SlimWhisperError, TypeError):
        return identity


def _read_record(out: Path, record_path: Path, identity: dict) -> dict:
    """The run record of a resumable run in `out` (a new one for a missing or empty folder)."""
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if _normalised(record.get("identity", {})) != identity:
            diff = sorted(k for k in identity if record.get("identity", {}).get(k) != identity[k])
            raise SlimWhisperError(f"{out} holds a fine-tuning run with other settings ({', '.join(diff)}); "
                                   "use another --out or pass --overwrite")
        return record
    if out.exists() and any(p.name not in _TEMPORARY for p in out.iterdir()):
        raise SlimWhisperError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    return {"identity": identity, "arms": {}}


def _join_processes(device: str | None) -> None:
    """Set up accelerate's process state as the training will (CPU processes join over gloo): made here with
    the default (GPU) choice, a CPU run's processes would each believe they are alone."""
    from accelerate import PartialState

    PartialState(cpu=on_cpu(device))


def _is_main() -> bool:
    """Only the main process of a multi-process (accelerate / torchrun) run writes files."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _barrier() -> None:
    """Wait for every process of a multi-process run (nothing to wait for in a single process)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _write_record(out: Path, record: dict) -> None:
    if not _is_main():
        return
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / RUN_FILE)


def _environment() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _train_arm(job: RecoveryJob, arm: str, model, processor, teacher, source, paths, out: Path,
               validation: ValidationSet | None, untrained: str) -> dict:
    """Train one arm (resuming if possible), keep it or its untrained state as `validation` says (the untrained
    arm reloaded from `untrained`), save it, return its record."""
    result = finetune(model, job.train, job.config, processor=processor, teacher=teacher, scope_paths=paths,
                      work_dir=out / "work" / arm, cache_dir=job.cache_dir, device=job.device, progress=job.progress)
    check = None
    if validation is not None:
        model, check = _validated(model, teacher, processor, validation, untrained, arm, job)
    if _is_main():
        if source is not None:
            model.config.slimwhisper_source = source  # the fine-tuned model still names its original
        _save_atomically(model, processor, out / arm)
    return {**result.to_dict(), "finished": True, "path": str(out / arm), "validation": check}


def _validated(model, teacher, processor, validation: ValidationSet, untrained: str, arm: str,
               job: RecoveryJob) -> tuple[Any, dict]:
    """The trained `model`, or a fresh load of `untrained` when that is closer to the original on the validation
    clips (KL per token), and the record of both readings."""
    from .. import load

    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    fresh, _ = load(untrained, device=job.device)
    after, before = distances([model, fresh], teacher, validation, processor.feature_extractor, pad_id)
    kept = "trained" if after["kl_per_token"] <= before["kl_per_token"] else "untrained"
    if kept == "untrained":
        model = fresh
        if _is_main():
            logger.warning("%s: training moved it away from the original on %s (KL per token %.4f, %.4f before); "
                           "keeping the untrained weights", arm, validation.source, after["kl_per_token"],
                           before["kl_per_token"])
    figures = ("kl_per_token", "top1_agreement", "encoder_error_audio")
    return model, {"data": validation.source, "clips": len(validation.items), "tokens": validation.tokens,
                   "before": {k: round(before[k], 6) for k in figures},
                   "after": {k: round(after[k], 6) for k in figures}, "kept": kept}


def _save_atomically(model, processor, target: Path) -> None:
    """Save into a hidden sibling, then rename it into place: a kill never leaves a half-written model."""
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_processor(processor, tmp)
    shutil.rmtree(target, ignore_errors=True)  # a model saved before a kill that came before the record
    os.replace(tmp, target)


def recover(job: RecoveryJob) -> dict:
    """Run the job: the compressed arm, then the control (when asked); returns the run record."""
    from .. import load

    config = job.config
    _join_processes(job.device)
    out, record = _prepare_out(job)
    for source in [job.train] if isinstance(job.train, str) else job.train:
        if not Path(source).expanduser().exists():
            raise SlimWhisperError(f"training data {source} does not exist; give a manifest.jsonl or dataset folder")
    checked, why = validation_source(job.validation, recorded(job.model, "compression"))
    source = recorded(job.model, "slimwhisper_source")
    model, processor = load(job.model, device=job.device)
    paths = converted_paths(model.config)
    check_encoder_weight(config, paths)
    if source is None and not paths:  # an uncompressed model (short name, plain directory) is its own original
        source = model.config.slimwhisper_source
    need_original = config.needs_teacher or job.control or checked is not None
    teacher, _, teacher_info = load_teacher(source, job.teacher, job.device) if need_original else (None, None, None)
    validation = None
    if checked is not None and any(not record["arms"].get(arm, {}).get("finished") for arm in _arms(job)):
        validation, checked, why = _validation_set(job, teacher, processor, checked, why)
    out.mkdir(parents=True, exist_ok=True)
    record.update(source=source, teacher=teacher_info, converted_paths=list(paths), environment=_environment(),
                  validation={"data": checked, "why": why})
    _write_record(out, record)  # before any training: a run killed in its first arm is recognised and resumed
    started = time.perf_counter()
    for arm in _arms(job):
        if record["arms"].get(arm, {}).get("finished") and (out / arm / "config.json").is_file():
            continue
        untrained = job.model if arm == "model" else teacher_info["name"]
        if arm == "control":
            model, processor = load(untrained, device=job.device)  # a fresh copy of the original
        record["arms"][arm] = _train_arm(job, arm, model, processor, teacher, source, paths, out, validation,
                                         untrained)
        _write_record(out, record)
        if _is_main():
            write_loss_plot(out)
    record["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
    _write_record(out, record)
    return record


def _validation_set(job: RecoveryJob, teacher, processor, checked: str,
                    why: str) -> tuple[ValidationSet | None, str | None, str]:
    """The validation clips of `checked`, with its record entries. Audio the user named must be readable; recorded
    calibration audio that is not (one audio file, or no clip of at most 30 s) only turns the check off."""
    config = job.config
    try:
        found = validation_set(teacher, processor, checked, config.language, config.max_label_tokens, job.cache_dir,
                               progress=job.progress and _is_main())
    except SlimWhisperError as error:
        if why == "given":
            raise
        if _is_main():
            logger.warning("the recorded calibration audio cannot serve as validation data (%s); training without the "
                           "check, pass --validation DATA to have one", error)
        return None, None, f"none ({why} is not a dataset of clips)"
    return found, checked, why


def _arms(job: RecoveryJob) -> tuple[str, ...]:
    return ARMS if job.control else ARMS[:1]


def write_loss_plot(out: Path) -> Path | None:
    """loss.png: total loss (and CE / KD) per step of each arm, from work/<arm>/loss.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange")):
        path = out / "work" / arm / "loss.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        for key, style in (("loss", "-"), ("ce", "--"), ("kd", ":"), ("enc", "-.")):
            values = [float(r[key]) for r in rows if r.get(key)]
            if len(values) == len(rows) and any(values):  # encoder distillation only when it ran
                ax.plot(steps, values, style, color=color, label=f"{arm} {key}", linewidth=1)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out / "loss.png")
    return out / "loss.png"
