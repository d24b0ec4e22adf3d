"""loading/convert.py: a CTranslate2 directory becomes the same Hugging Face Whisper."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loading.ct2_writer import ct2_whisper, logits, state, write_ct2_dir
from slimwhisper.loading.convert import CT2Files, convert_ct2


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_converter_reproduces_every_tensor(tmp_path: Path, quantization: str) -> None:
    original = ct2_whisper()
    converted, _ = convert_ct2(CT2Files.from_directory(write_ct2_dir(tmp_path, original, quantization)))
    want, got = state(original), state(converted)
    assert set(got) == set(want)
    for name, value in want.items():
        if quantization == "float32":
            assert torch.equal(got[name], value), name
        elif quantization == "float16" or value.ndim != 2 or "embed_positions" in name:
            assert torch.equal(got[name], value.half().float()), name
        else:  # int8 rows: error at most half a quantisation step, amax / 127 / 2
            step = value.abs().amax(dim=1, keepdim=True) / 127
            assert ((got[name] - value).abs() <= step / 2 + 1e-7).all(), name
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    tolerance = {"float32": 1e-5, "float16": 2e-2, "int8": 1e-1}[quantization]
    torch.testing.assert_close(logits(converted), logits(original), atol=tolerance, rtol=0)
