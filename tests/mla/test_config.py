"""mla/config.py: recipes are validated, round-trip, and impossible geometries are refused."""
from __future__ import annotations

import json

import pytest

import slimwhisper as sw
from slimwhisper.errors import ConfigVersionError, SlimWhisperError


@pytest.mark.parametrize("kwargs", [
    {"latent_dim": 65},  # wider than d_model
    {"kept_dims": 17},  # more than the head dim (16)
    {"kept_dims": 16, "kv_reduction": 0.875},  # kept dims alone exceed the budget
])
def test_impossible_geometry_is_rejected(tiny_model, kwargs):
    with pytest.raises(SlimWhisperError):
        sw.convert(tiny_model, sw.MLAConfig(factorization="joint", **kwargs))


@pytest.mark.parametrize("kwargs", [
    {"modules": ("decoder",)}, {"kv_reduction": 1.5}, {"latent_rank": 2, "kv_reduction": 0.5},
    {"selection": "best"}, {"factorization": "qr"}, {"kept_dims": 3, "selection": "high"},
])
def test_invalid_recipes_are_rejected(kwargs):
    with pytest.raises(SlimWhisperError):
        sw.MLAConfig(**kwargs)


def test_recipe_round_trips_and_refuses_newer_versions():
    cfg = sw.MLAConfig(modules=("decoder_self", "decoder_cross"), kept_dims=2, kv_reduction=0.75)
    assert sw.MLAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigVersionError):
        sw.MLAConfig.from_dict({**cfg.to_dict(), "version": 99})
