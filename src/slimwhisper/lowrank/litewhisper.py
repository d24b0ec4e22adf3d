"""Read and write LiteASR's published `lite-whisper` checkpoint layout.

On disk (config.json + model.safetensors): a Whisper config with `model_type = "lite-whisper"` and
`low_rank_config`, a list with one {"q_proj": k, ..., "fc1": k, "fc2": k} dict per encoder layer
(missing key = dense layer); each low-rank linear stores `weight1` [in, k], `weight2` [k, out] and
`bias` [out] under the original module name, and y = (x @ weight1) @ weight2 + bias. Our
`LowRankLinear` keeps the nn.Linear layout: down.weight = weight1^T, up.weight = weight2^T.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from ..errors import SlimWhisperError
from ..models import SlimWhisperForConditionalGeneration
from ..models.rebuild import rebuild
from .config import TARGETS

ARCHITECTURE = "LiteWhisperForConditionalGeneration"
_SHORT = {t: t.split(".")[-1] for t in TARGETS}  # "self_attn.q_proj" -> "q_proj"
_LONG = {v: k for k, v in _SHORT.items()}
_DROP_KEYS = ("model_type", "architectures", "auto_map", "low_rank_config", "transformers_version", "compression",
              "slimwhisper_source")


def low_rank_config(model: SlimWhisperForConditionalGeneration) -> list[dict[str, int]]:
    """The `low_rank_config` list of a model compressed with the "lowrank" method."""
    compression = getattr(model.config, "compression", None) or {}
    extra = sorted(set(compression) - {"format_version", "lowrank"})
    if extra:
        raise SlimWhisperError(f"the lite-whisper format holds only a low-rank encoder; this model also uses {extra}")
    layers = compression.get("lowrank", {}).get("layers", {})
    out: list[dict[str, int]] = [{} for _ in range(model.config.encoder_layers)]
    for name, rank in layers.items():
        i, target = name.split(".", 4)[3], name.split(".", 4)[4]
        out[int(i)][_SHORT[target]] = int(rank)
    return out


def save_lite_whisper(model: SlimWhisperForConditionalGeneration, out_dir: str | Path) -> Path:
    """Write `model` in the lite-whisper layout (config.json, model.safetensors, generation_config.json)."""
    if (getattr(model.config, "compression", None) or {}).get("lowrank", {}).get("head_dims"):
        raise SlimWhisperError("the lite-whisper layout has no narrowed heads: save this model in the hf format, or "
                               "compress without --attention-budget")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lr_config = low_rank_config(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "proj_out.weight":  # tied to the token embedding
            continue
        if key.endswith(".down.weight"):
            state[key[: -len(".down.weight")] + ".weight1"] = tensor.T.contiguous()
        elif key.endswith(".up.weight"):
            state[key[: -len(".up.weight")] + ".weight2"] = tensor.T.contiguous()
        elif key.endswith(".up.bias"):
            state[key[: -len(".up.bias")] + ".bias"] = tensor.contiguous()
        else:
            state[key] = tensor.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    data = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_KEYS}
    data.update(model_type="lite-whisper", architectures=[ARCHITECTURE], low_rank_config=lr_config)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    return out


def load_lite_whisper(path: str | Path) -> SlimWhisperForConditionalGeneration:
    """Load a lite-whisper checkpoint directory as a `SlimWhisperForConditionalGeneration` (strict)."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise SlimWhisperError(f"{path} is not a lite-whisper checkpoint (needs config.json and model.safetensors)")
    data = json.loads(config_file.read_text())
    if "low_rank_config" not in data:
        raise SlimWhisperError(f"{config_file} has no low_rank_config; it is not a lite-whisper checkpoint")
    lr_config = data["low_rank_config"]
    whisper_config = WhisperConfig(**{k: v for k, v in data.items() if k not in _DROP_KEYS})
    if len(lr_config) != whisper_config.encoder_layers:
        raise SlimWhisperError(
            f"low_rank_config lists {len(lr_config)} layers but the encoder has {whisper_config.encoder_layers}"
        )
    ranks: dict[str, int] = {}
    for i, layer in enumerate(lr_config):
        for short, rank in layer.items():
            if short not in _LONG:
                raise SlimWhisperError(f"low_rank_config[{i}] names an unknown linear {short!r}")
            ranks[f"model.encoder.layers.{i}.{_LONG[short]}"] = int(rank)
    raw = load_file(str(weights_file))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        base, _, leaf = key.rpartition(".")
        if base in ranks:
            mapped = {"weight1": ("down.weight", True), "weight2": ("up.weight", True), "bias": ("up.bias", False)}
            if leaf not in mapped:
                raise SlimWhisperError(f"unexpected tensor {key} in a low-rank linear")
            name, transpose = mapped[leaf]
            state[f"{base}.{name}"] = tensor.T.contiguous() if transpose else tensor
        else:
            state[key] = tensor
    with torch.device("meta"):
        skeleton = WhisperForConditionalGeneration(whisper_config)
    if "proj_out.weight" not in state and "model.decoder.embed_tokens.weight" in state:
        state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    generation = path / "generation_config.json"
    skeleton.generation_config = GenerationConfig.from_pretrained(path) if generation.is_file() else GenerationConfig()
    spec = {"recipe": None, "layers": ranks, "source": "lite-whisper"}
    skeleton.eval()
    try:
        model = rebuild(skeleton, {"lowrank": spec}, state, replaced=tuple(ranks))
    except RuntimeError as exc:
        raise SlimWhisperError(f"{path}: tensors do not match low_rank_config ({str(exc)[:300]})") from exc
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise SlimWhisperError(f"{path}: checkpoint lacks {missing[:3]}; it is incomplete")
    return model
