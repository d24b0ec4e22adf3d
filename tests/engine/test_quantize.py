"""engine/quantize.py: int8 quantisation of plain and MLA models, direct and stacked int8 calls."""
from __future__ import annotations

import torch

import slimwhisper as sw
from conftest import engine_tokens, generate_tokens, varied_features, varied_whisper
from slimwhisper.engine.quantize import (
    Int8Call,
    direct_call,
    quantize_dynamic_int8,
    quantize_linear_int8,
    stack_int8_rows,
)


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
    per_tensor = quantize_dynamic_int8(torch.nn.Sequential(*[torch.nn.Sequential(m) for m in float_linears]))
    modules = [per_tensor[i][0] for i in range(3)] + [quantize_linear_int8(float_linears[1])]  # last: per row
    x = torch.randn(2, 5, 16, generator=gen) * 3
    with torch.inference_mode():
        for m in modules:
            assert isinstance(direct_call(m), Int8Call) and torch.equal(direct_call(m)(x), m(x))
        assert direct_call(float_linears[0]) is float_linears[0]
        stacked = stack_int8_rows(modules)
        assert torch.equal(stacked(x), torch.cat([m(x) for m in modules], dim=-1))
    assert stack_int8_rows([modules[0], float_linears[1]]) is None and stack_int8_rows([]) is None
