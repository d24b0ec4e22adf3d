"""loading/mapping.py: tensors the mapping cannot place are refused clearly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loading.ct2_writer import ct2_variables, ct2_whisper, optimise, serialise, write_ct2_dir
from slimwhisper.errors import SlimWhisperError
from slimwhisper.loading.convert import CT2Files, convert_ct2


def test_unknown_tensor_is_reported(tmp_path: Path) -> None:
    extra = {"encoder/layer_0/self_attention/rotary/weight": np.ones((4, 4), np.float32)}
    directory = write_ct2_dir(tmp_path, ct2_whisper(), extra=extra)
    with pytest.raises(SlimWhisperError, match="does not understand.*rotary/weight"):
        convert_ct2(CT2Files.from_directory(directory))


def test_nonzero_key_bias_is_rejected(tmp_path: Path) -> None:
    model = ct2_whisper()
    variables = ct2_variables(model)
    variables["encoder/layer_0/self_attention/linear_0/bias"][64:128] = 0.5
    directory = tmp_path / "ct2"
    write_ct2_dir(directory, model)
    (directory / "model.bin").write_bytes(serialise(*optimise(variables, "float32")))
    with pytest.raises(SlimWhisperError, match="non-zero key bias"):
        convert_ct2(CT2Files.from_directory(directory))
