"""models/configuration.py: a newer compression format is refused with what to do."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSpeechSeq2Seq

import slimwhisper as sw
from slimwhisper.errors import ConfigVersionError


def test_unknown_format_version_is_a_clear_error(tmp_path, tiny_model):
    cfg = sw.MLAConfig(modules=("decoder_self", "encoder_self"), kv_reduction=0.75, kept_dims=2, factorization="joint")
    sw.convert(tiny_model, cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["compression"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigVersionError, match="upgrade"):
        AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)
