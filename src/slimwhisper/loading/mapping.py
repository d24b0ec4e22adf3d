"""Map CTranslate2 Whisper tensors onto Hugging Face `WhisperForConditionalGeneration` names.

CTranslate2 fuses projections that Hugging Face keeps apart: self-attention `linear_0` is
[q; k; v] (3d x d) and cross-attention `linear_1` is [k; v] (2d x d). Hugging Face's `k_proj` has
no bias, so CTranslate2 stores zeros there; they are checked and dropped. The output projection
is an alias of the token embeddings (tied), as in every Whisper checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import SlimWhisperError

_LINEAR = (("weight", "weight"), ("bias", "bias"))
_NORM = (("gamma", "weight"), ("beta", "bias"))
_ACTIVATIONS = {0: "relu", 1: "gelu_pytorch_tanh", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}
_EXPECTED_FLAGS = {  # CTranslate2 decoder flags that must hold for a Whisper decoder
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_ZERO_BIAS_ATOL = 1e-6  # CTranslate2 writes exact zeros for the missing key bias
_HEAD_DIM = 64  # every released Whisper size uses 64-wide heads; fallback for old files


@dataclass(frozen=True)
class WhisperDims:
    """The architecture of a Whisper checkpoint, named as `WhisperConfig` arguments."""

    vocab_size: int
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    activation_function: str

    def as_config_kwargs(self) -> dict[str, int | str]:
        """Keyword arguments for `WhisperConfig`."""
        return asdict(self)


class _Source:
    """Name lookup over CTranslate2 tensors that follows aliases and records what was used."""

    def __init__(self, tensors: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
        self.tensors = tensors
        self.aliases = dict(aliases)
        self.used: set[str] = set()

    def names(self) -> set[str]:
        """Every name the checkpoint defines, real or alias."""
        return set(self.tensors) | set(self.aliases)

    def target(self, name: str) -> str:
        """The stored variable behind `name`."""
        return self.aliases.get(name, name)

    def take(self, name: str) -> np.ndarray:
        """The tensor called `name` (through its alias), marked as used."""
        target = self.target(name)
        if target not in self.tensors:
            raise SlimWhisperError(f"model.bin has no tensor {name}; is this a Whisper model?")
        self.used.update((name, target))
        return self.tensors[target]

    def leftovers(self) -> list[str]:
        """Names no mapping rule consumed: dropping them would silently change the model."""
        return sorted(self.names() - self.used)


def _count_layers(names: set[str], side: str) -> int:
    """Number of `side/layer_<i>/` blocks, which must be numbered 0..n-1."""
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise SlimWhisperError(f"model.bin has gaps in its {side} layers: {sorted(found)}")
    return len(found)


def infer_dims(
    tensors: dict[str, np.ndarray], aliases: dict[str, str], scalars: dict[str, object]
) -> WhisperDims:
    """Read the architecture off tensor shapes and the CTranslate2 scalar metadata."""
    src = _Source(tensors, aliases)
    names = src.names()
    for key in ("decoder/embeddings/weight", "encoder/conv1/weight", "encoder/layer_0/ffn/linear_0/weight"):
        if key not in names:
            raise SlimWhisperError(f"model.bin has no {key}: it is not a Whisper model")
    vocab_size, d_model = src.tensors[src.target("decoder/embeddings/weight")].shape
    for flag, expected in _EXPECTED_FLAGS.items():
        if flag in scalars and int(scalars[flag]) != expected:
            raise SlimWhisperError(f"model.bin sets {flag}={scalars[flag]}; Whisper needs {expected}")
    activation = int(scalars.get("decoder/activation", 3))
    if activation not in _ACTIVATIONS:
        raise SlimWhisperError(f"model.bin uses unknown activation id {activation}")

    def heads(side: str) -> int:
        return int(scalars.get(f"{side}/num_heads", d_model // _HEAD_DIM))

    def shape(name: str) -> tuple[int, ...]:
        return src.tensors[src.target(name)].shape

    return WhisperDims(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        num_mel_bins=int(shape("encoder/conv1/weight")[1]),
        encoder_layers=_count_layers(names, "encoder"),
        decoder_layers=_count_layers(names, "decoder"),
        encoder_attention_heads=heads("encoder"),
        decoder_attention_heads=heads("decoder"),
        encoder_ffn_dim=int(shape("encoder/layer_0/ffn/linear_0/weight")[0]),
        decoder_ffn_dim=int(shape("decoder/layer_0/ffn/linear_0/weight")[0]),
        max_source_positions=int(shape("encoder/position_encodings/encodings")[0]),
        max_target_positions=int(shape("decoder/position_encodings/encodings")[0]),
        activation_function=_ACTIVATIONS[activation],
    )


def _torch(array: np.ndarray) -> torch.Tensor:
    """An owned, contiguous float32 copy: safe to keep after the mapped file goes away."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))


def _rename(src: _Source, ct2: str, hf: str, pairs: tuple[tuple[str, str], ...], out: dict) -> None:
    """Copy the leaves of one CTranslate2 layer (e.g. gamma/beta) to Hugging Face names."""
    for ct2_leaf, hf_leaf in pairs:
        out[f"{hf}.{hf_leaf}"] = _torch(src.take(f"{ct2}/{ct2_leaf}"))


def _split_fused(src: _Source, ct2: str, hf: str, projections: tuple[str, ...], out: dict) -> None:
    """Split a fused [q; k; v] or [k; v] projection into Hugging Face's separate linears."""
    weight, bias = src.take(f"{ct2}/weight"), src.take(f"{ct2}/bias")
    rows = weight.shape[0] // len(projections)
    if rows * len(projections) != weight.shape[0] or bias.shape != (weight.shape[0],):
        raise SlimWhisperError(
            f"model.bin {ct2} has shape {weight.shape}, not {len(projections)} fused parts"
        )
    for i, proj in enumerate(projections):
        part = slice(i * rows, (i + 1) * rows)
        out[f"{hf}.{proj}.weight"] = _torch(weight[part])
        if proj != "k_proj":
            out[f"{hf}.{proj}.bias"] = _torch(bias[part])
        elif np.abs(bias[part]).max(initial=0.0) > _ZERO_BIAS_ATOL:
            raise SlimWhisperError(
                f"model.bin {ct2} has a non-zero key bias (max {np.abs(bias[part]).max():.3g}); "
                "Whisper's key projection has no bias, so this is not a Whisper checkpoint"
            )


def _layer(src: _Source, side: str, i: int, out: dict) -> None:
    """Map one encoder or decoder block."""
    ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
    qkv = ("q_proj", "k_proj", "v_proj")
    _split_fused(src, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", qkv, out)
    _rename(src, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", _LINEAR, out)
    _rename(src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", _NORM, out)
    if side == "decoder":
        _rename(src, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", _LINEAR, out)
        _split_fused(src, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"), out)
        _rename(src, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", _LINEAR, out)
        _rename(src, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", _NORM, out)
    _rename(src, f"{ct2}/ffn/linear_0", f"{hf}.fc1", _LINEAR, out)
    _rename(src, f"{ct2}/ffn/linear_1", f"{hf}.fc2", _LINEAR, out)
    _rename(src, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", _NORM, out)


def _check_tied_projection(src: _Source) -> None:
    """The output projection must be the token embedding (Hugging Face ties the two)."""
    name, embeddings = "decoder/projection/weight", "decoder/embeddings/weight"
    if name not in src.names():
        return
    aliased = src.target(name) == src.target(embeddings)
    if not aliased and not np.array_equal(src.take(name), src.take(embeddings)):
        raise SlimWhisperError("model.bin has an output projection that differs from the token embeddings")
    src.take(name)


def map_to_hf(
    tensors: dict[str, np.ndarray], aliases: dict[str, str], dims: WhisperDims
) -> dict[str, torch.Tensor]:
    """A complete `WhisperForConditionalGeneration` state dict (fp32) from CTranslate2 tensors.

    Raises:
        SlimWhisperError: a tensor is missing, has the wrong shape, or is left unused.
    """
    src, out = _Source(tensors, aliases), {}
    for conv in ("conv1", "conv2"):
        _rename(src, f"encoder/{conv}", f"model.encoder.{conv}", _LINEAR, out)
    out["model.encoder.embed_positions.weight"] = _torch(src.take("encoder/position_encodings/encodings"))
    for i in range(dims.encoder_layers):
        _layer(src, "encoder", i, out)
    _rename(src, "encoder/layer_norm", "model.encoder.layer_norm", _NORM, out)
    out["model.decoder.embed_tokens.weight"] = _torch(src.take("decoder/embeddings/weight"))
    out["model.decoder.embed_positions.weight"] = _torch(src.take("decoder/position_encodings/encodings"))
    for i in range(dims.decoder_layers):
        _layer(src, "decoder", i, out)
    _rename(src, "decoder/layer_norm", "model.decoder.layer_norm", _NORM, out)
    _check_tied_projection(src)
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    if leftovers := src.leftovers():
        raise SlimWhisperError(
            f"model.bin has {len(leftovers)} tensors this converter does not understand (a Whisper "
            f"variant it cannot represent?): {', '.join(leftovers[:12])}"
        )
    return out
