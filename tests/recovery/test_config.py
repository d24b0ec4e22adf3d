"""recovery/config.py: the fine-tuning config validates and round-trips."""
from __future__ import annotations

import json

import pytest

from slimwhisper.errors import SlimWhisperError
from slimwhisper.recovery import FinetuneConfig


def test_config_validates_and_round_trips():
    c = FinetuneConfig(scope="decoder", schedule="wsd", betas=(0.8, 0.9))
    assert FinetuneConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in (dict(scope="encoder"), dict(batch_size=6, micro_batch_size=4), dict(lr=0), dict(steps=0),
                dict(ce_weight=0, kd_weight=0), dict(schedule="linear"), dict(encoder_audio_weight=0),
                dict(encoder_audio_weight=1.5)):
        with pytest.raises(SlimWhisperError):
            FinetuneConfig(**bad)
