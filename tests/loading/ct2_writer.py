"""A tiny random Whisper written in the CTranslate2 layout, for the loading tests.

A small writer defined here (fp32 / fp16 / bf16 / int8 + scales, aliases, legacy binary versions) serialises
a Hugging Face Whisper as faster-whisper stores it, so the loader can be checked tensor by tensor and logit by
logit without CTranslate2 installed.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from slimwhisper.loading.processor import timestamp_tokens

SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]  # fmt: skip


EOT, SOT, NO_TS = 256, 257, 265  # ids in the synthetic byte-level vocabulary below
VOCAB = 256 + len(SPECIALS) + 1501  # bytes + control tokens + timestamps
CT2_DTYPES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def ct2_whisper(seed: int = 0, ffn: tuple[int, int] = (128, 96)) -> WhisperForConditionalGeneration:
    """Random Whisper (d_model 64, 2+2 layers, 4 heads) with every parameter perturbed.

    Layer norms and biases get random values so a swapped tensor changes the logits; one pair is
    made identical on purpose so the writer emits an alias for it, as CTranslate2 does.
    """
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=ffn[0], decoder_ffn_dim=ffn[1],
        num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.5 if "norm" in name or "bias" in name else 0.05))
        enc = model.model.encoder.layers
        enc[1].final_layer_norm.weight.copy_(enc[0].final_layer_norm.weight)
    return model


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The CTranslate2 Whisper variables of `model` (fused projections, zero key bias, scalars)."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def linear(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2: str, hf: str, projs: list[str]) -> None:
        out[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.{p}.weight"] for p in projs])
        biases = [sd.get(f"{hf}.{p}.bias", np.zeros(sd[f"{hf}.{p}.weight"].shape[0], np.float32)) for p in projs]
        out[f"{ct2}/bias"] = np.concatenate(biases)

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/projection/weight"] = sd["proj_out.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for side in ("encoder", "decoder"):
        for i in range(2):
            c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{c}/self_attention/linear_0", f"{h}.self_attn", ["q_proj", "k_proj", "v_proj"])
            linear(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            linear(f"{c}/ffn/linear_0", f"{h}.fc1")
            linear(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
            if side == "decoder":
                linear(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                fused(f"{c}/attention/linear_1", f"{h}.encoder_attn", ["k_proj", "v_proj"])
                linear(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
    scalars = {"encoder/num_heads": np.int16(4), "decoder/num_heads": np.int16(4), "decoder/activation": np.int8(3),
               "decoder/pre_norm": np.int8(1), "decoder/alibi": np.int8(0), "decoder/alignment_heads": np.int16(1),
               "decoder/alignment_layer": np.int16(-1), "decoder/scale_embeddings": np.int8(0)}  # fmt: skip
    return out | {k: np.array(v) for k, v in scalars.items()}


def optimise(variables: dict[str, np.ndarray], quantization: str) -> tuple[dict, dict[str, str]]:
    """CTranslate2's save-time steps: alias exact duplicates (first name in sorted order wins), then quantise."""
    kept: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    for name in sorted(variables):
        value = variables[name]
        same = (k for k, v in kept.items() if v.ndim and v.shape == value.shape and np.array_equal(v, value))
        twin = next(same, None)
        if value.ndim and twin is not None:
            aliases[name] = twin
        else:
            kept[name] = value
    out = {}
    for name, value in kept.items():
        if value.ndim == 0 or value.dtype.kind != "f":
            out[name] = value
        elif quantization == "int8" and value.ndim == 2 and name.endswith("weight"):
            amax = np.abs(value).max(axis=1)
            scale = (127.0 / np.where(amax == 0, 127.0, amax)).astype(np.float32)
            out[name] = np.rint(value * scale[:, None]).astype(np.int8)
            out[f"{name}_scale"] = scale
        elif quantization in ("float16", "int8"):
            out[name] = value.astype(np.float16)
        elif quantization == "bfloat16":
            out[name] = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation
        else:
            out[name] = value.astype(np.float32)
    return out, aliases


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def serialise(variables: dict, aliases: dict[str, str], version: int = 6, dtypes: dict | None = None) -> bytes:
    """Bytes of a model.bin in binary `version` (1..6). `dtypes` overrides a variable's dtype name."""
    dtypes = dtypes or {}
    body = [struct.pack("<I", version)]
    if version >= 2:
        body += [_string("WhisperSpec"), struct.pack("<I", 3)]
    body.append(struct.pack("<I", len(variables)))
    for name in sorted(variables):
        value = np.array(variables[name], order="C")  # ascontiguousarray would make scalars 1-d
        dtype = dtypes.get(name, value.dtype.name)
        body += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape)]
        if version >= 4:
            body.append(struct.pack("<BI", CT2_DTYPES[dtype], value.nbytes))
        else:
            body.append(struct.pack("<BI", value.itemsize, value.size))
        body.append(value.tobytes())
    if version >= 3:
        body.append(struct.pack("<I", len(aliases)))
        body += [_string(a) + _string(t) for a, t in sorted(aliases.items())]
    return b"".join(body)


def write_tokenizer(path: Path, with_timestamps: bool) -> None:
    """A byte-level BPE tokenizer.json with Whisper's control tokens (an English-only layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    if with_timestamps:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in timestamp_tokens()])
    tok.save(str(path))


def write_ct2_dir(
    directory: Path, model: WhisperForConditionalGeneration, quantization: str = "float32", *,
    version: int = 6, with_timestamps: bool = False, extra: dict | None = None,
) -> Path:  # fmt: skip
    """A faster-whisper style directory: model.bin, config.json, tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model) | (extra or {})
    if version >= 3:
        variables, aliases = optimise(variables, quantization)
    else:  # no aliases before v3 (the tied projection is written out) and only 4-byte floats
        variables, aliases = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in variables.items()}, {}
    dtypes = {k: "bfloat16" for k, v in variables.items() if v.dtype == np.uint16}
    (directory / "model.bin").write_bytes(serialise(variables, aliases, version, dtypes))
    config = {"suppress_ids": [1, 2, 258, 259], "suppress_ids_begin": [220, EOT], "lang_ids": [258, 259],
              "alignment_heads": [[1, 0], [1, 2]]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory / "tokenizer.json", with_timestamps)
    return directory


def logits(model: WhisperForConditionalGeneration, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    features = torch.randn(1, 80, 3000) * 0.5
    tokens = torch.tensor([[SOT, NO_TS, 40, 41, 42]])
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


def state(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
