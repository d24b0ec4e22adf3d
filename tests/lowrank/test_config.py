"""lowrank/config.py: presets, validation and round trips of the low-rank recipe."""
from __future__ import annotations

import pytest

from slimwhisper.errors import ConfigVersionError, SlimWhisperError
from slimwhisper.lowrank import LowRankConfig, parse_theta


def test_config_validation_presets_and_roundtrip():
    default = LowRankConfig()
    assert (default.preset, default.energy, default.theta_attn, default.theta_mlp) == ("a", "squared", 0.999, 0.999)
    sq = LowRankConfig(preset="b", energy="squared")
    assert (sq.theta_attn, sq.theta_mlp) == (0.99, 0.999)
    assert LowRankConfig(theta_attn=0.9).theta_mlp == 0.9
    for cfg in (LowRankConfig(preset="c"), LowRankConfig(theta_attn=0.9, theta_mlp=0.95), LowRankConfig(rank=32)):
        assert LowRankConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_theta("0.99:0.999") == (0.99, 0.999) and parse_theta("0.9") == (0.9, 0.9)
    for bad in ({"preset": "z"}, {"theta_attn": 1.5}, {"granule": 12}, {"energy": "cubic"}, {"rank": 0},
                {"preset": "a", "rank": 16}, {"targets": ("fc3",)}):
        with pytest.raises(SlimWhisperError):
            LowRankConfig(**bad)
    with pytest.raises(SlimWhisperError):
        parse_theta("a:b")
    with pytest.raises(ConfigVersionError):
        LowRankConfig(version=99)
    with pytest.raises(ConfigVersionError):
        LowRankConfig.from_dict({"nope": 1})


def test_budget_is_its_own_recipe():
    config = LowRankConfig(budget=0.6)
    assert config.budget == 0.6 and config.preset is None and config.theta_for("fc1") is None
    assert LowRankConfig.from_dict(config.to_dict()) == config
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(SlimWhisperError, match="budget"):
            LowRankConfig(budget=bad)
    with pytest.raises(SlimWhisperError, match="only one"):
        LowRankConfig(budget=0.5, preset="b")


def test_budgets_share_by_role_unless_the_recipe_predates_it():
    assert LowRankConfig(budget=0.6).allocation == "roles"
    saved = LowRankConfig(budget=0.6, allocation="uniform").to_dict()
    assert LowRankConfig.from_dict(saved).allocation == "uniform"
    older = {k: v for k, v in LowRankConfig(rank=64).to_dict().items() if k not in ("allocation", "audio_weight")}
    restored = LowRankConfig.from_dict(older)  # written before either field: one rank, every frame alike
    assert restored.allocation == "uniform" and restored.audio_weight is None
    with pytest.raises(SlimWhisperError, match="roles, uniform, greedy"):
        LowRankConfig(budget=0.6, allocation="even")
