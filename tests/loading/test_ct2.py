"""loading/ct2.py: the model.bin reader, every dtype, split parts, older binary versions."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from loading.ct2_writer import ct2_variables, ct2_whisper, logits, optimise, serialise, write_bytes, write_ct2_dir
from slimwhisper.errors import SlimWhisperError
from slimwhisper.loading import read_ct2
from slimwhisper.loading.convert import CT2Files, convert_ct2


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_reader_returns_what_was_written(tmp_path: Path, quantization: str) -> None:
    variables, aliases = optimise(ct2_variables(ct2_whisper()), quantization)
    path = tmp_path / "model.bin"
    bf16 = {k: "bfloat16" for k, v in variables.items() if v.dtype == np.uint16}
    path.write_bytes(serialise(variables, aliases, 6, bf16))
    ckpt = read_ct2(path)
    assert (ckpt.binary_version, ckpt.spec, ckpt.spec_revision) == (6, "WhisperSpec", 3)
    assert ckpt.aliases == aliases and "decoder/projection/weight" in aliases
    assert "encoder/layer_1/ffn/layer_norm/gamma" in aliases  # the deliberate duplicate
    assert set(ckpt.variables) == set(variables)
    for name, value in variables.items():
        got = ckpt.variables[name]
        if value.dtype == np.uint16:  # bfloat16 bits come back widened to float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_reader_handles_parts_split_mid_tensor(tmp_path: Path) -> None:
    """PyPI packages split model.bin; the cut may fall anywhere, even inside a header."""
    blob = serialise(*optimise(ct2_variables(ct2_whisper()), "float16"))
    whole = read_ct2(write_bytes(tmp_path / "model.bin", blob))
    for cut in (3, 1000, len(blob) // 2, len(blob) - 5):
        parts = [write_bytes(tmp_path / f"p{cut}.1", blob[:cut]), write_bytes(tmp_path / f"p{cut}.2", blob[cut:])]
        split = read_ct2(parts)
        assert split.aliases == whole.aliases
        assert all(np.array_equal(split.variables[k], v) for k, v in whole.variables.items())


@pytest.mark.parametrize("version", [1, 3, 5])
def test_older_binary_versions(tmp_path: Path, version: int) -> None:
    """v1 has no spec name and no aliases; v1-3 store item sizes instead of dtype ids."""
    original = ct2_whisper()
    converted, _ = convert_ct2(CT2Files.from_directory(write_ct2_dir(tmp_path, original, version=version)))
    torch.testing.assert_close(logits(converted), logits(original), atol=1e-5, rtol=0)


def test_unsupported_binary_version(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "model.bin", struct.pack("<I", 7) + b"\0" * 16)
    with pytest.raises(SlimWhisperError, match="binary version 7 is not supported"):
        read_ct2(path)
