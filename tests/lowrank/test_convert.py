"""lowrank/convert.py: exact at theta 1, smaller when compressed, composes with MLA."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from conftest import logits
from slimwhisper.errors import SlimWhisperError
from slimwhisper.info import describe
from slimwhisper.lowrank import LowRankConfig, LowRankLinear, WhisperLowRankEncoderLayer

EXACT = LowRankConfig(theta_attn=1.0, theta_mlp=1.0, granule=8, dense_if_no_saving=False)


def test_theta_one_reproduces_logits(tiny_model, features, encoder_stats):
    slim = sw.convert(tiny_model, EXACT, calibration=encoder_stats)
    assert isinstance(slim, sw.SlimWhisperForConditionalGeneration)
    assert sum(isinstance(m, LowRankLinear) for m in slim.modules()) == 12
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() <= 1e-4
    k_proj = slim.model.encoder.layers[0].self_attn.k_proj
    # k_proj (no bias in Whisper) gains one, mu - V V^T mu, which is 0 at full rank (V V^T = I)
    assert k_proj.rank == 64 and k_proj.up.bias.shape == (64,)
    torch.testing.assert_close(k_proj.up.bias, torch.zeros(64), atol=1e-4, rtol=0)


def test_compression_shrinks_encoder_and_changes_outputs(tiny_model, features, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(theta_attn=0.5, theta_mlp=0.5, granule=8), calibration=encoder_stats)
    layers = slim.config.compression["lowrank"]["layers"]
    assert layers and all(k % 8 == 0 for k in layers.values())
    # the recorded ranks are the modules' ranks, and the factors have those shapes
    built = {name: m for name, m in slim.named_modules() if isinstance(m, LowRankLinear)}
    assert {name: m.rank for name, m in built.items()} == layers
    assert all(m.down.weight.shape == (m.rank, m.in_features) for m in built.values())
    info = describe(slim.config)

    def encoder_params(model):
        return sum(p.numel() for p in model.model.encoder.parameters())

    assert info["encoder_params"] == {"original": encoder_params(tiny_model), "compressed": encoder_params(slim)}
    assert info["encoder_params"]["compressed"] < info["encoder_params"]["original"]
    assert info["lowrank"]["ranks"] == layers
    assert (logits(slim, features) - logits(tiny_model, features)).abs().max() > 1e-3
    # the original is untouched
    assert isinstance(tiny_model.model.encoder.layers[0].fc1, torch.nn.Linear)


@pytest.mark.parametrize("order", ["mla_first", "lowrank_first"])
def test_composes_with_mla(tiny_model, features, encoder_stats, tmp_path, order):
    mla_cfg = sw.MLAConfig(modules=("decoder_self",), kv_reduction=0.5, factorization="joint")
    lr_cfg = LowRankConfig(rank=8, granule=8)
    if order == "mla_first":
        both = sw.convert(sw.convert(tiny_model, mla_cfg), lr_cfg, calibration=encoder_stats)
    else:
        both = sw.convert(sw.convert(tiny_model, lr_cfg, calibration=encoder_stats), mla_cfg)
    assert {"mla", "lowrank"} <= set(both.config.compression)
    assert any(isinstance(m, sw.WhisperMLAAttention) for m in both.modules())
    assert any(isinstance(m, LowRankLinear) for m in both.modules())
    both.save_pretrained(tmp_path / "both")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "both")
    assert all(isinstance(layer, WhisperLowRankEncoderLayer) for layer in again.model.encoder.layers)
    torch.testing.assert_close(logits(again, features), logits(both, features))
    with pytest.raises(SlimWhisperError):
        sw.convert(both, lr_cfg, calibration=encoder_stats)
    with pytest.raises(SlimWhisperError):
        sw.convert(both, mla_cfg)


def test_probed_error_is_the_factorised_linears_error(encoder_stats):
    """The probe (outputs projected by a hook) measures exactly what the factorised linear does to the encoder."""
    import copy

    from conftest import calib_audio, tiny_whisper
    from slimwhisper.lowrank.calibrate import probe_errors, probe_windows
    from slimwhisper.lowrank.convert import find_linears
    from slimwhisper.lowrank.math import pca_factors, probe_ranks

    model = tiny_whisper().eval()
    name = "model.encoder.layers.0.fc1"
    linears = {name: find_linears(model, ("fc1",))[name]}
    features, weights = probe_windows(model, calib_audio(), 2, 0.8)
    errors = probe_errors(model, linears, encoder_stats, features, granule=8, progress=False)
    weighed = probe_errors(model, linears, encoder_stats, features, granule=8, progress=False, weights=weights)
    d_in, d_out = linears[name].in_features, linears[name].out_features
    assert sorted(errors[name]) == probe_ranks(d_in, d_out, 8)
    k = probe_ranks(d_in, d_out, 8)[1]
    first, second, bias = pca_factors(linears[name].weight, linears[name].bias, encoder_stats.layers[name].mean(),
                                      None, k, encoder_stats.basis(name))
    factored = copy.deepcopy(model)
    low = LowRankLinear(d_in, d_out, k)
    with torch.no_grad():
        low.down.weight.copy_(first.float())
        low.up.weight.copy_(second.float())
        low.up.bias.copy_(bias.float())
    factored.model.encoder.layers[0].fc1 = low
    with torch.no_grad():
        ref = model.get_encoder()(features).last_hidden_state.double()
        out = factored.get_encoder()(features).last_hidden_state.double()
    error = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert error > 0 and errors[name][k] == pytest.approx(error, rel=1e-3)
    # weighted, as the calibration weighs frames: each frame's error and energy count by its weight
    w = weights.double()[..., None]
    error = float((w * (out - ref).pow(2)).sum() / (w * ref.pow(2)).sum())
    assert weighed[name][k] == pytest.approx(error, rel=1e-3) and weighed[name][k] != pytest.approx(errors[name][k])
    # fewer components, more error
    ranks = sorted(errors[name])
    assert errors[name][ranks[0]] > errors[name][ranks[-1]]


def test_budget_conversion_keeps_its_share_of_flops_and_reloads(tiny_model, features, tmp_path):
    from conftest import calib_audio

    slim = sw.convert(tiny_model, LowRankConfig(budget=0.5, granule=8), calibration=calib_audio(), progress=False)
    spec = slim.config.compression["lowrank"]
    assert spec["recipe"]["budget"] == 0.5 and 0 < spec["linear_flops_kept"] <= 0.5
    linears = {n: m for n, m in slim.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in linears.items()} == spec["layers"]
    dense = sum(m.in_features * m.out_features for m in tiny_model.modules()
                if isinstance(m, torch.nn.Linear) and m in set(tiny_model.model.encoder.modules()))
    kept = sum(m.rank * (m.in_features + m.out_features) - m.in_features * m.out_features for m in linears.values())
    assert (dense + kept) / dense == pytest.approx(spec["linear_flops_kept"], abs=1e-6)
    assert describe(slim.config)["lowrank"]["linear_flops_kept"] == spec["linear_flops_kept"]
    slim.save_pretrained(tmp_path / "m")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(again, features), logits(slim, features))


def test_a_rank_that_saves_nothing_is_refused_before_calibrating(tiny_model):
    """tiny_model's linears are 64x64 and 64x128 (at most rank 42 saves compute): rank 43 would keep all of
    them dense, so it is refused before any audio is read (the calibration path does not exist), naming 42;
    rank 42 passes the check and only then fails on the missing audio."""
    with pytest.raises(SlimWhisperError, match="at most 42"):
        sw.convert(tiny_model, LowRankConfig(rank=43, granule=8), calibration="/nonexistent/audio")
    with pytest.raises(SlimWhisperError) as missing:
        sw.convert(tiny_model, LowRankConfig(rank=42, granule=8), calibration="/nonexistent/audio")
    assert "saves nothing" not in str(missing.value)


def _factorised(model, stats, ranks):
    """A copy of `model` whose linears in `ranks` are their rank-k PCA factor pairs."""
    import copy

    from slimwhisper.lowrank.math import pca_factors

    out = copy.deepcopy(model)
    for name, k in ranks.items():
        linear = out.get_submodule(name)
        first, second, bias = pca_factors(linear.weight, linear.bias, stats.layers[name].mean(), None, k,
                                          stats.basis(name))
        low = LowRankLinear(linear.in_features, linear.out_features, k)
        with torch.no_grad():
            low.down.weight.copy_(first.float())
            low.up.weight.copy_(second.float())
            low.up.bias.copy_(bias.float())
        parent, attr = name.rsplit(".", 1)
        setattr(out.get_submodule(parent), attr, low)
    return out


def test_role_probe_measures_the_factorised_encoder_with_every_linear_truncated(encoder_stats):
    """RoleProbe (outputs projected by hooks, all at once) measures exactly what the factor pairs do together."""
    from conftest import calib_audio, tiny_whisper
    from slimwhisper.lowrank.calibrate import RoleProbe, frame_weights, probe_windows, weighted_error
    from slimwhisper.lowrank.convert import find_linears

    model = tiny_whisper().eval()
    linears = find_linears(model, LowRankConfig().targets)
    features, weights = probe_windows(model, calib_audio(), 2, 0.8)
    assert torch.equal(weights, frame_weights([125, 125], 0.8))  # 2-s clips: 100 frames of audio + 25
    ranks = {n: (8 if "fc" in n else 16) for n in linears}
    probe = RoleProbe(model, linears, encoder_stats, dict.fromkeys(linears, 32), features, weights)
    with torch.no_grad():
        reference = model.get_encoder()(features).last_hidden_state
        output = _factorised(model, encoder_stats, ranks).get_encoder()(features).last_hidden_state
    expected = weighted_error(output, reference, weights)
    assert expected > 0 and probe.error(ranks) == pytest.approx(expected, rel=1e-3)
    assert probe.error(dict.fromkeys(linears)) == 0.0  # all dense: the original
    # weighted: the padding counts for its share of the weight, not for its number of frames
    assert weighted_error(output, reference, None) != pytest.approx(expected, rel=1e-3)


def test_roles_allocation_shares_ranks_by_role_and_errs_less_than_one_rank_for_all(tiny_model, features, tmp_path):
    from conftest import calib_audio
    from slimwhisper.lowrank.calibrate import RoleProbe, probe_windows
    from slimwhisper.lowrank.config import ROLE_PROBE_WINDOWS, ROLES
    from slimwhisper.lowrank.convert import find_linears
    from slimwhisper.lowrank.math import uniform_budget_ranks

    config = LowRankConfig(budget=0.5, granule=8)
    assert config.allocation == "roles"
    stats = sw.lowrank.calibrate(tiny_model, calib_audio(), progress=False)
    slim = sw.convert(tiny_model, config, calibration=calib_audio(), progress=False)
    spec = slim.config.compression["lowrank"]
    assert 0 < spec["linear_flops_kept"] <= 0.5
    linears = find_linears(tiny_model, config.targets)
    chosen = {n: spec["layers"].get(n) for n in linears}
    for targets in ROLES.values():  # one rank per role, the same in every layer
        assert len({chosen[n] for n in linears if n.split(".", 4)[-1] in targets}) == 1
    uniform = uniform_budget_ranks({n: (m.in_features, m.out_features) for n, m in linears.items()}, 0.5, 8)
    assert chosen != uniform
    probe_features, weights = probe_windows(tiny_model, calib_audio(), ROLE_PROBE_WINDOWS, config.audio_weight)
    probe = RoleProbe(tiny_model, linears, stats, dict.fromkeys(linears, 56), probe_features, weights)
    assert probe.error(chosen) < probe.error(uniform)
    slim.save_pretrained(tmp_path / "m")
    again = sw.SlimWhisperForConditionalGeneration.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(again, features), logits(slim, features))


def test_info_line_names_each_linears_rank():
    from slimwhisper.info import rank_summary
    from slimwhisper.lowrank.config import TARGETS

    def at(target: str, *ranks: int) -> dict[str, int]:
        return {f"model.encoder.layers.{i}.{target}": r for i, r in enumerate(ranks) if r}

    ranks = {**at("self_attn.q_proj", 96, 96), **at("self_attn.k_proj", 96, 96), **at("fc1", 160, 128),
             **at("fc2", 64, 0)}
    assert rank_summary(ranks, 2, TARGETS) == \
        "q_proj, k_proj 96 · v_proj, out_proj dense · fc1 128-160 · fc2 64, dense in 1 of 2 layers"
