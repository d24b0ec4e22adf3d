"""engine/quantize.py: int8 quantisation of plain, MLA and low-rank models, direct and stacked int8 calls."""
from __future__ import annotations

import pytest
import torch

import slimwhisper as sw
from conftest import SHARED_DATA, calib_audio, engine_tokens, generate_tokens, varied_features, varied_whisper
from slimwhisper.engine.quantize import (
    Int8Call,
    direct_call,
    is_quantized_linear,
    quantize_dynamic_int8,
    stack_int8_rows,
)
from slimwhisper.lowrank import LowRankConfig, LowRankLinear


def test_transcriber_int8_quantisation_runs_on_mla(tiny_model):
    slim = sw.convert(varied_whisper(), sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    q = quantize_dynamic_int8(slim)
    assert type(q.model.decoder.layers[0].fc1).__name__ == "Linear" and "quantized" in type(q.proj_out).__module__
    assert isinstance(q.model.decoder.layers[0].self_attn.up_k, torch.nn.Linear)
    features = varied_features(2)
    # the engine decodes the int8 MLA model as `generate` decodes it (its int8 calls are the modules')
    assert engine_tokens(q, features) == generate_tokens(q, features)


def test_direct_int8_calls_give_the_modules_results_bitwise():
    """`direct_call` runs an int8 linear's op itself (float modules are returned as they are);
    `stack_int8_rows` keeps every row's int8 weights and scale, so one call equals the separate calls."""
    gen = torch.Generator().manual_seed(0)
    float_linears = [torch.nn.Linear(16, n, bias=b) for n, b in ((8, False), (12, True), (8, True))]
    for lin in float_linears:
        torch.nn.init.normal_(lin.weight, generator=gen)
    per_row = quantize_dynamic_int8(torch.nn.Sequential(*[torch.nn.Sequential(m) for m in float_linears]))
    modules = [per_row[i][0] for i in range(3)] + [per_tensor_int8(float_linears[1])]  # last: one scale
    x = torch.randn(2, 5, 16, generator=gen) * 3
    with torch.inference_mode():
        for m in modules:
            assert isinstance(direct_call(m), Int8Call) and torch.equal(direct_call(m)(x), m(x))
        assert direct_call(float_linears[0]) is float_linears[0]
        stacked = stack_int8_rows(modules)
        assert torch.equal(stacked(x), torch.cat([m(x) for m in modules], dim=-1))
    assert stack_int8_rows([modules[0], float_linears[1]]) is None and stack_int8_rows([]) is None


def per_tensor_int8(linear: torch.nn.Linear) -> torch.nn.Module:
    """torch's default dynamic int8 linear: one weight scale for the whole matrix."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(torch.nn.Sequential(linear), dtype=torch.qint8, inplace=False)[0]


def test_int8_weights_have_a_scale_per_row_so_rows_of_small_weights_keep_their_precision():
    """A linear whose rows differ in size (as a low-rank `down` half's do, along the principal directions):
    with one scale per row, the small rows' outputs are as exact as the large rows'; with one scale for the
    matrix they round to a few levels."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 64, generator=gen) * torch.logspace(0, -3, 16)[:, None])
    q = quantize_dynamic_int8(torch.nn.Sequential(linear))[0]
    weight = q.weight()
    assert weight.qscheme() == torch.per_channel_affine and weight.q_per_channel_axis() == 0
    x = torch.randn(32, 64, generator=gen)
    with torch.inference_mode():
        ref = linear(x) - linear.bias
        rel = ((q(x) - linear.bias - ref).norm(dim=0) / ref.norm(dim=0))
        rel_tensor = ((per_tensor_int8(linear)(x) - linear.bias - ref).norm(dim=0) / ref.norm(dim=0))
    assert rel.max() < 0.05  # every row alike, the smallest included (the activations round too)
    assert rel_tensor[-1] > 10 * rel[-1]  # one scale for all: the smallest row loses its precision


def test_lowrank_encoder_int8_quantises_the_down_halves_and_stays_close_to_fp32(tiny_model, encoder_stats):
    """The `down` half of every `LowRankLinear` becomes int8 and the `up` half, fed by PCA coordinates (and read
    as a tensor by the rank-space attention), stays float; the int8 encoder stays close to the float one on
    both attention paths."""
    slim = sw.convert(tiny_model, LowRankConfig(rank=8, granule=8), calibration=encoder_stats)
    reduced, standard = (layer.self_attn for layer in slim.model.encoder.layers)
    standard.attention_path = "standard"
    assert reduced.reduced_plan(1500) == (True, True) and standard.reduced_plan(1500) == (False, False)
    q = quantize_dynamic_int8(slim)
    halves = [m for m in q.model.encoder.modules() if isinstance(m, LowRankLinear)]
    assert len(halves) == 12
    for lin in halves:
        assert is_quantized_linear(lin.down) and type(lin.up) is torch.nn.Linear
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = slim.get_encoder()(features).last_hidden_state
        out = q.get_encoder()(features).last_hidden_state
    assert not torch.equal(out, ref)  # int8 did run
    torch.testing.assert_close(out, ref, atol=0.02 * ref.abs().max().item(), rtol=0.0)


@pytest.mark.real
def test_real_lowrank_encoder_int8_is_as_close_as_the_dense_one():
    """On tiny.en's real weights a low-rank encoder quantised to int8 stays as close to its float self as the
    dense encoder does: quantising the `up` halves (their input is PCA coordinates, whose first components
    carry Whisper's huge activation channels) made its output error nine times the dense encoder's."""
    from conftest import realspeech_audio
    from slimwhisper.calibration import feature_batches

    model, _ = sw.load("tiny.en")
    slim = sw.convert(model, LowRankConfig(rank=208, targets=("fc1", "fc2")), progress=False)
    audio = realspeech_audio(lambda rows: rows[:2]) if SHARED_DATA.is_dir() else calib_audio(2)
    features = next(feature_batches(audio, 80, 2))

    def error(m) -> float:
        with torch.inference_mode():
            ref = m.get_encoder()(features).last_hidden_state
            out = quantize_dynamic_int8(m).get_encoder()(features).last_hidden_state
        return float((out - ref).pow(2).mean() / ref.pow(2).mean())

    dense, low = error(model.eval()), error(slim.eval())
    assert 0 < low < 2 * dense
