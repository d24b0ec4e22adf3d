"""bench/encoder.py: encoder pass timing and parameter ratios, the per-part profile, the roofline, --quantize int8."""
from __future__ import annotations

import json
import statistics
from unittest import mock

import pytest
import torch

import slimwhisper as sw
from slimwhisper.bench.encoder import (
    PROFILE_PARTS,
    bench_encoder,
    encoder_params,
    op_part,
    profile_passes_median,
    summary_lines,
)
from slimwhisper.cli import main
from slimwhisper.engine.quantize import is_quantized_linear, quantize_dynamic_int8
from slimwhisper.lowrank import LowRankConfig
from slimwhisper.roofline import MachinePeaks, encoder_roofline

PEAKS = MachinePeaks(gflops=50.0, gbps=10.0)


def test_encoder_bench(tiny_model):
    result = bench_encoder({"baseline": tiny_model, "model": tiny_model}, repeats=2, profile=False, roofline=False)
    ms = result["ms_per_pass"]
    for key, ms_per_pass in ms.items():  # the median of the repeats, which are kept rounded
        assert ms_per_pass == pytest.approx(statistics.median(result["times_ms"][key]), abs=1e-3), key
    assert result["speedup"] == {"model": ms["baseline"] / ms["model"]}
    encoder_params = sum(p.numel() for p in tiny_model.model.encoder.parameters())
    assert result["params"] == {"baseline": encoder_params, "model": encoder_params}
    assert result["params_ratio"]["model"] == 1.0
    assert "profile" not in result and "roofline" not in result


def test_op_names_map_to_profile_parts():
    assert op_part("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_part("aten::einsum") == "attention"  # the rank-space attention's products
    assert op_part("aten::gelu") == "gelu" and op_part("aten::native_layer_norm") == "layer_norm"
    assert op_part("aten::conv1d") == op_part("aten::mkldnn_convolution") == "conv"
    assert op_part("aten::copy_") == op_part("aten::contiguous") == op_part("aten::_to_copy") == "copies"
    assert op_part("slimwhisper::linear_lowrank") == "linear_lowrank"
    assert op_part("aten::add") is None and op_part("aten::empty") is None  # counted in "other"


def test_profile_splits_dense_and_lowrank_linears_and_the_roofline_is_each_models(tiny_model, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
    models = {"baseline": tiny_model, "model": slim}
    result = bench_encoder(models, repeats=1, warmup=0, peaks=PEAKS)
    assert result["profile_passes"] == 1
    for name, prof in result["profile"].items():
        assert set(prof) == {*PROFILE_PARTS, "total", "wall"}
        assert prof["total"] == pytest.approx(sum(prof[p] for p in PROFILE_PARTS))
        assert 0 < prof["total"] <= prof["wall"] * 1.001 + 0.1  # op times lie inside the profiled pass
        for part in ("attention", "gelu", "layer_norm", "conv"):
            assert prof[part] > 0, (name, part)
    base, low = result["profile"]["baseline"], result["profile"]["model"]
    assert base["linear_dense"] > 0 and base["linear_lowrank"] == 0
    assert low["linear_lowrank"] > 0 and low["linear_dense"] == 0  # rank 8: every encoder linear is low-rank
    roof = result["roofline"]
    assert roof["machine"] == {"gflops": 50.0, "gbps": 10.0}
    for name, m in models.items():
        entry = dict(roof["entries"][name])
        parts = entry.pop("gflops_parts")
        assert entry == encoder_roofline(m, 1, result["ms_per_pass"][name], PEAKS)
        assert parts["conv"] == pytest.approx(entry["gflop_parts"]["conv"] / result["profile"][name]["conv"] * 1e3)
    assert roof["entries"]["model"]["gflop"] < roof["entries"]["baseline"]["gflop"]
    bound = roof["entries"]["baseline"]["bound_ms"] / roof["entries"]["model"]["bound_ms"]
    assert set(roof["speedup_bound"]) == {"model"} and roof["speedup_bound"]["model"] == pytest.approx(bound)
    assert bound > 1
    lines = summary_lines(result)
    assert len(lines) == 4 and "roofline" in lines[2] and "linear_lowrank" in lines[3]


def test_several_profiled_passes_give_each_parts_median_models_in_turns():
    calls = []

    def fake_pass(model, features):
        calls.append(model)
        n = len(calls)  # passes 1, 3, 5 are model "a"'s, 2, 4, 6 model "b"'s
        return {**{part: 0.0 for part in PROFILE_PARTS}, "attention": float(n), "conv": float(10 - n),
                "wall": 100.0 + n}

    with mock.patch("slimwhisper.bench.encoder.profile_pass", side_effect=fake_pass):
        out = profile_passes_median({"a": "A", "b": "B"}, None, 3)
    assert calls == ["A", "B"] * 3
    assert (out["a"]["attention"], out["a"]["conv"], out["a"]["wall"]) == (3.0, 7.0, 103.0)
    assert (out["b"]["attention"], out["b"]["conv"], out["b"]["total"]) == (4.0, 6.0, 10.0)


def test_encoder_params_count_int8_linears(tiny_model):
    assert encoder_params(quantize_dynamic_int8(tiny_model)) == encoder_params(tiny_model)


def test_cli_quantize_int8_times_int8_models(capsys, tiny_model, encoder_stats):
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
    models = {"MODEL": slim, "BASE": tiny_model}
    seen = {}

    def timed(models, *args, **kwargs):
        seen.update(models)
        return bench_encoder(models, *args, peaks=MachinePeaks(50.0, 10.0, int8_gflops=200.0), **kwargs)

    with mock.patch("slimwhisper.bench.encoder.load_for_bench", side_effect=lambda name, *a: models[name]), \
            mock.patch("slimwhisper.bench.encoder.bench_encoder", side_effect=timed):
        code = main(["bench", "encoder", "MODEL", "--baseline", "BASE", "--quantize", "int8", "--repeats", "1",
                     "--warmup", "0", "--device", "cpu", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"] == "int8"
    assert all(e["int8_linears"] for e in result["roofline"]["entries"].values())
    assert result["roofline"]["machine"]["int8_gflops"] == 200.0
    assert result["params_ratio"]["model"] == pytest.approx(encoder_params(slim) / encoder_params(tiny_model))
    # the models timed are int8 copies: the down halves int8, the up halves (fed by PCA coordinates) float
    fc1 = seen["model"].model.encoder.layers[0].fc1
    assert seen["model"] is not slim and is_quantized_linear(fc1.down) and type(fc1.up) is torch.nn.Linear
    assert result["attention_path"] == "auto"


def test_cli_attention_path_reaches_every_low_rank_attention(capsys, tiny_model, encoder_stats):
    """--attention-path sets the model's path; the baseline (here the same model, loaded again) keeps auto."""
    config = LowRankConfig(rank=8, granule=8)
    models = {"MODEL": sw.convert(tiny_model, config, calibration=encoder_stats),
              "BASE": sw.convert(tiny_model, config, calibration=encoder_stats)}
    with mock.patch("slimwhisper.bench.encoder.load_for_bench", side_effect=lambda name, *a: models[name]):
        code = main(["bench", "encoder", "MODEL", "--baseline", "BASE", "--attention-path", "standard", "--repeats",
                     "1", "--warmup", "0", "--profile-passes", "0", "--device", "cpu", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["attention_path"] == "standard"
    paths = {name: {layer.self_attn.attention_path for layer in m.model.encoder.layers} for name, m in models.items()}
    assert paths == {"MODEL": {"standard"}, "BASE": {"auto"}}


def test_cli_quantize_on_a_gpu_is_one_line_before_loading(capsys):
    with mock.patch("slimwhisper.bench.encoder.load_for_bench") as load:
        code = main(["bench", "encoder", "MODEL", "--quantize", "int8", "--device", "cuda"])
    assert code == 2 and not load.called
    err = capsys.readouterr().err.strip()
    assert "CPU only" in err and "\n" not in err and "Traceback" not in err
