"""Benchmarks on tiny random models: decode timing keys, static-cache decode, KV bytes, CLI JSON, metadata."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

import slimwhisper as sw
from slimwhisper.bench import common
from slimwhisper.bench.decode import bench_decode, prepare_decode, prepare_engine_decode
from slimwhisper.bench.encoder import bench_encoder
from slimwhisper.bench.kv import bench_kv, max_batch
from slimwhisper.cli import main
from slimwhisper.engine.cache import StaticLayer
from slimwhisper.errors import SlimWhisperError
from slimwhisper.memory import decode_step_traffic, decoder_weight_bytes, kv_cache_bytes


@pytest.fixture
def slim(tiny_model):
    cfg = sw.MLAConfig(kv_reduction=0.75, kept_dims=2, factorization="joint", modules=("decoder_self", "decoder_cross"))
    return sw.convert(tiny_model, cfg)


def test_decode_bench_returns_positive_times_and_matching_bytes(tiny_model, slim):
    result = bench_decode(slim, tiny_model, batch=2, cache_len=6, repeats=2, warmup=1, caches=("dynamic", "static"),
                          encoder_frames=20)
    entries = {"baseline", "model", "model_materialized", "baseline_static", "model_static",
               "model_materialized_static"}
    assert set(result["ms_per_token"]) == entries
    assert all(v > 0 for v in result["ms_per_token"].values())
    assert set(result["speedup"]) == entries - {"baseline"}
    assert set(result["speedup_same_cache"]) == entries - {"baseline", "baseline_static"}
    ms = result["ms_per_token"]
    assert result["speedup_same_cache"]["model_static"] == ms["baseline_static"] / ms["model_static"]
    assert all(len(t) == 2 and min(t) > 0 for t in result["times_ms"].values())
    assert result["batch"] == 2 and result["cache_len"] == 6 and result["encoder_frames"] == 20
    for name, b in result["cache_bytes"].items():
        assert b["held_self"] == b["analytic_self"] > 0 and b["held_cross"] == b["analytic_cross"] > 0, name
    assert result["cache_bytes"]["model"]["held_self"] < result["cache_bytes"]["baseline"]["held_self"]
    assert all(m.decode_mode == "absorbed" for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention))
    traffic = result["traffic"]
    assert set(traffic["bytes_per_step"]) == {"baseline", "model", "baseline_static", "model_static"}
    dynamic, static = traffic["bytes_per_step"]["model"], traffic["bytes_per_step"]["model_static"]
    assert dynamic["self_cache"] == 3 * static["self_cache"] == 3 * result["cache_bytes"]["model"]["analytic_self"]
    assert traffic["bound_speedup"]["model_static"] == (
        traffic["bytes_per_step"]["baseline_static"]["total"] / static["total"]
    ) > 1


@pytest.mark.parametrize("self_only", [True, False])
def test_engine_decode_step_equals_the_hf_step_and_is_timed_as_its_own_kind(tiny_model, self_only):
    """The "engine" kind times the Transcriber's decode step: same logits as the HF step on the same prefill
    (MHA and MLA, self-only or self + cross), step after step, and the cache is cropped back each time."""
    modules = ("decoder_self",) if self_only else ("decoder_self", "decoder_cross")
    slim = sw.convert(tiny_model, sw.MLAConfig(kv_reduction=0.75, kept_dims=2, factorization="joint",
                                               modules=modules))
    for m in (tiny_model, slim):
        hf, engine = prepare_decode(m, 2, 6, 20), prepare_engine_decode(m, 2, 6, 20)
        with torch.inference_mode():
            for _ in range(2):
                torch.testing.assert_close(engine.step(), hf.step()[:, -1], atol=1e-4, rtol=1e-4)
        assert engine.cache.get_seq_length() == hf.cache.get_seq_length() == 6
    result = bench_decode(slim, tiny_model, batch=2, cache_len=6, repeats=2, warmup=1, caches=("dynamic", "engine"),
                          encoder_frames=20, materialized=False)
    assert set(result["ms_per_token"]) == {"baseline", "model", "baseline_engine", "model_engine"}
    assert set(result["speedup_same_cache"]) == {"model", "model_engine"}
    assert result["traffic"]["bytes_per_step"]["model_engine"]["self_cache"] == (
        result["cache_bytes"]["model"]["analytic_self"]  # written in place: read once
    )


def test_step_traffic_counts_decoder_weights_once_and_caches_by_kind(tiny_model):
    """Decoder layers + final norm + LM head (tied to the embedding: once); int8 linears one byte per weight."""
    decoder = tiny_model.model.decoder
    expected = sum(p.numel() * 4 for p in [*decoder.layers.parameters(), *decoder.layer_norm.parameters()])
    expected += tiny_model.proj_out.weight.numel() * 4
    assert tiny_model.proj_out.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # tied in this config
    assert decoder_weight_bytes(tiny_model) == expected
    int8 = sw.engine.quantize.quantize_dynamic_int8(tiny_model)
    linear_weights = sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))
    linear_weights += tiny_model.proj_out.weight.numel()
    assert decoder_weight_bytes(int8) == expected - 3 * linear_weights  # 4 bytes -> 1 per linear weight
    kv = kv_cache_bytes(tiny_model, 3, 7, torch.float32, 20)
    for concatenated, factor in ((True, 3), (False, 1)):
        t = decode_step_traffic(tiny_model, 3, 7, torch.float32, 20, concatenated=concatenated)
        assert (t.self_cache, t.cross_cache) == (factor * kv.self_attention, kv.cross_attention)
        assert t.total == t.weights + t.self_cache + t.cross_cache


def test_decode_bench_adds_an_unfolded_entry_only_when_folding(tiny_model, slim):
    small = sw.convert(tiny_model, sw.MLAConfig(latent_dim=8, factorization="joint"))  # folds both (docs/mla.md)
    kwargs = dict(batch=1, cache_len=4, repeats=1, warmup=0, encoder_frames=10, materialized=False)
    assert set(bench_decode(small, **kwargs)["ms_per_token"]) == {"model", "model_unfolded"}
    assert set(bench_decode(small, fold="never", **kwargs)["ms_per_token"]) == {"model"}
    assert set(bench_decode(slim, **kwargs)["ms_per_token"]) == {"model"}  # d_c = 32 of 64: no fold pays
    assert set(bench_decode(slim, fold="always", **kwargs)["ms_per_token"]) == {"model", "model_unfolded"}
    assert all(m.fold == "auto" for m in slim.modules() if isinstance(m, sw.WhisperMLAAttention))


@pytest.mark.parametrize("which", ["mha", "mla"])
def test_static_cache_decode_equals_dynamic(tiny_model, slim, which):
    """Steps on preallocated buffers (non-contiguous views) give the same logits, and the length stays fixed."""
    model = slim if which == "mla" else tiny_model
    dynamic = prepare_decode(model, batch=3, cache_len=5, encoder_frames=30)
    static = prepare_decode(model, batch=3, cache_len=5, encoder_frames=30, cache="static", shared=dynamic)
    layer = static.cache.self_attention_cache.layers[0]
    assert isinstance(layer, StaticLayer) and layer.keys.shape[-2] == 6  # capacity: cache_len + the new token
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(static.step(), dynamic.step(), atol=1e-5, rtol=1e-5)
            assert static.cache.get_seq_length() == dynamic.cache.get_seq_length() == 5


def test_static_cache_overflow_is_an_error_and_crop_drops_positions():
    layer = StaticLayer.holding(torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 3, 2), max_len=3)
    with pytest.raises(SlimWhisperError, match="capacity"):
        layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    layer.crop(-1)
    assert layer.get_seq_length() == 2
    keys, values = layer.update(torch.full((1, 1, 1, 2), 5.0), torch.full((1, 1, 1, 2), 7.0))
    assert keys.data_ptr() == layer.keys.data_ptr()  # a view of the buffer, not a copy
    assert keys[0, 0, :, 0].tolist() == [0.0, 0.0, 5.0] and values[0, 0, :, 0].tolist() == [1.0, 1.0, 7.0]
    layer.crop(-2)
    assert layer.get_seq_length() == 1


def test_prepare_decode_rejects_too_long_caches(tiny_model):
    with pytest.raises(SlimWhisperError, match="positions"):
        prepare_decode(tiny_model, batch=1, cache_len=tiny_model.config.max_target_positions)


def test_kv_bench_held_equals_analytic_and_budget(tiny_model, slim):
    result = bench_kv({"baseline": tiny_model, "model": slim}, [1, 4], [8, 16], torch.float16, budget_bytes=2**20)
    base, model = result["models"]["baseline"], result["models"]["model"]
    for entry in (base, model):
        check = entry["held_check"]
        assert check["equal"] and check["held_self"] == check["analytic_self"] > 0
        assert len(entry["table"]) == 4
    d, layers = tiny_model.config.d_model, tiny_model.config.decoder_layers
    assert base["self_bytes_per_token"] == layers * 2 * d * 2
    assert model["self_ratio_vs_baseline"] == pytest.approx(0.25) and model["cross_ratio_vs_baseline"] == 0.25
    per_seq = kv_cache_bytes(slim, batch=1, tokens=16, dtype=torch.float16)
    assert max_batch(slim, 2**20, 16, torch.float16) == {"self": 2**20 // per_seq.self_attention,
                                                          "self_cross": 2**20 // per_seq.total}
    assert model["max_batch_in_budget"]["self"] > base["max_batch_in_budget"]["self"]


def test_encoder_bench(tiny_model):
    result = bench_encoder({"baseline": tiny_model, "model": tiny_model}, repeats=2)
    assert all(v > 0 for v in result["ms_per_pass"].values()) and result["params_ratio"]["model"] == 1.0


def test_interleaved_times_alternate_and_run_hooks():
    calls: list[str] = []
    times = common.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2,
                                     warmup=1, before={"b": lambda: calls.append("hook")})
    assert calls == ["a", "hook", "b"] * 3
    assert [len(t) for t in times.values()] == [2, 2]
    with pytest.raises(SlimWhisperError):
        common.interleaved_times({"a": lambda: None}, repeats=0)


def test_run_metadata_describes_machine_and_versions():
    meta = common.run_metadata(threads=1)
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["threads"] >= 1 and meta["machine"]["cpu"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["slimwhisper"] == sw.__version__
    assert meta["settings"] == {"threads": 1}
    assert common.peak_rss_bytes() > 0


@pytest.mark.parametrize("command", ["decode", "kv", "encoder"])
def test_cli_prints_json(capsys, tiny_model, slim, command):
    models = {"MODEL": slim, "BASE": tiny_model}
    extra = {"decode": ["--batch", "2", "--cache-len", "4", "--repeats", "2", "--warmup", "0", "--encoder-frames",
                        "10", "--threads", "1"],
             "kv": ["--batches", "1", "2", "--lengths", "4"],
             "encoder": ["--repeats", "1", "--warmup", "0"]}[command]
    threads = torch.get_num_threads()
    with mock.patch(f"slimwhisper.bench.{command}.load_for_bench", side_effect=lambda name, *a: models[name]):
        code = main(["bench", command, "MODEL", "--baseline", "BASE", *extra, "--json"])
    torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["machine"]["cpu"] and result["versions"]["transformers"]
    if command == "decode":
        ms = result["ms_per_token"]
        assert ms["baseline"] > 0 and ms["model"] > 0 and result["speedup"]["model"] > 0
        assert result["threads"] == 1
    elif command == "kv":
        assert result["models"]["model"]["held_check"]["equal"]
    else:
        assert result["ms_per_pass"]["model"] > 0


def test_cli_bad_threads_is_a_user_error(capsys, tiny_model):
    with mock.patch("slimwhisper.bench.decode.load_for_bench", return_value=tiny_model):
        assert main(["bench", "decode", "X", "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err


@pytest.mark.real
def test_product_owner_check_on_tiny_en(capsys):
    code = main(["bench", "decode", "tiny.en", "--baseline", "tiny.en", "--batch", "2", "--cache-len", "8",
                 "--repeats", "2", "--json"])
    assert code == 0
    ms = json.loads(capsys.readouterr().out)["ms_per_token"]
    assert ms["baseline"] > 0 and ms["model"] > 0


def test_bench_e2e_cli_reports_every_system(tmp_path, capsys):
    """`bench e2e` on a saved tiny model: the JSON keys the owner checks; faster-whisper is skipped with a reason
    (the model was not read from CTranslate2 files); the fp32 engine and generate agree on every transcript."""
    from test_recovery import tiny_pair, write_clips

    from slimwhisper.loading.processor import save_processor

    model, processor = tiny_pair(False)
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    manifest = write_clips(tmp_path / "d", n=3)
    out = tmp_path / "e2e"
    argv = ["bench", "e2e", "--model", str(tmp_path / "m"), "--data", str(manifest), "--batch", "2", "--json",
            "--out", str(out), "--per-token-rounds", "3"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "result.json").read_text())
    rtf, wer = printed["rtf"], printed["wer"]
    assert {"slimwhisper", "hf_generate", "faster_whisper_int8"} <= set(rtf) and set(rtf) == set(wer)
    for system in ("slimwhisper", "slimwhisper_fp32", "hf_generate"):
        assert rtf[system] > 0 and wer[system] >= 0
    assert rtf["faster_whisper_int8"] is None and "CTranslate2" in printed["details"]["faster_whisper_int8"]["skipped"]
    assert wer["slimwhisper_fp32"] == wer["hf_generate"]
    assert printed["details"]["slimwhisper"]["engine"]["quantize"] == "int8"
    assert printed["audio_seconds"] == pytest.approx(3 * 0.6, rel=1e-3)
    # decoder-only per-token figures: the fp32 engine and generate decode the same tokens from the same encoder
    # outputs, so their token counts agree exactly (a miscount of generate's output would show here)
    assert set(printed["per_token"]) == {"batch_2", "batch_1"}
    for figures in printed["per_token"].values():
        assert set(figures["ms_per_token"]) == {"slimwhisper", "slimwhisper_fp32", "hf_generate"}
        assert all(v > 0 for v in figures["ms_per_token"].values())
        assert figures["tokens"]["slimwhisper_fp32"] == figures["tokens"]["hf_generate"] > 0
        assert figures["speedup_vs_hf_generate"]["slimwhisper"] > 0
        assert figures["rounds"] == 3 and all(len(r) == 3 for r in figures["rounds_s"].values())
        assert figures["decode_s"]["hf_generate"] == pytest.approx(min(figures["rounds_s"]["hf_generate"]), abs=1e-3)


def test_bench_e2e_compiled_system_is_opt_in_and_reports_compile_time(tmp_path, capsys, monkeypatch):
    """`slimwhisper_compiled` is accepted but not run by default; it asks torch.compile for the encoder only
    (stubbed here, so CI does not compile), runs unquantised (the engine refuses compile with int8), and, the
    stub being the identity, transcribes exactly like `slimwhisper_fp32`."""
    from test_recovery import tiny_pair, write_clips

    from slimwhisper.bench import e2e
    from slimwhisper.loading.processor import save_processor

    compiled: list = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model, processor = tiny_pair(False)
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    manifest = write_clips(tmp_path / "d", n=3)
    assert "slimwhisper_compiled" not in e2e.SYSTEMS
    argv = ["bench", "e2e", "--model", str(tmp_path / "m"), "--data", str(manifest), "--batch", "2", "--json",
            "--systems", "slimwhisper_fp32", "slimwhisper_compiled", "--no-per-token"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [getattr(fn, "__name__", None) for fn in compiled] == ["encode"]
    assert set(printed["rtf"]) == set(printed["wer"]) == {"slimwhisper_fp32", "slimwhisper_compiled"}
    assert printed["rtf"]["slimwhisper_compiled"] > 0 and printed["per_token"] is None
    assert printed["wer"]["slimwhisper_compiled"] == printed["wer"]["slimwhisper_fp32"]
    details = printed["details"]["slimwhisper_compiled"]
    assert {"wall_s", "output_tokens", "ms_per_output_token", "engine", "compile_s", "compiled",
            "graphs_compiled_while_timed", "graph_breaks"} <= set(details)
    assert details["compiled"] == "encoder" and details["engine"]["quantize"] is None
    assert details["compile_s"] == details["engine"]["warmup_s"] > 0 and details["graphs_compiled_while_timed"] == 0
    assert details["graph_breaks"] == 0  # the stub compiles nothing
    assert details["output_tokens"] == printed["details"]["slimwhisper_fp32"]["output_tokens"]
    with pytest.raises(SlimWhisperError, match="unquantised"):
        sw.Transcriber(model, processor, quantize="int8", compile=True)
    assert e2e._batch_sizes([torch.zeros(16000 * 31).numpy(), torch.zeros(100).numpy()], 2) == [2, 1]
