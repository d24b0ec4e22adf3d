"""`slimwhisper bench decode|kv|encoder`: JSON on stdout, user errors exit 2."""
from __future__ import annotations

import json
import statistics
from unittest import mock

import pytest
import torch
import transformers

from slimwhisper.bench.common import cpu_model
from slimwhisper.cli import main


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
    assert result["machine"]["cpu"] == cpu_model() and result["versions"]["transformers"] == transformers.__version__
    if command == "decode":  # the options reach the benchmark, and its figures are its medians and their ratio
        ms = result["ms_per_token"]
        assert (result["batch"], result["cache_len"], result["encoder_frames"], result["repeats"]) == (2, 4, 10, 2)
        assert ms["model"] == pytest.approx(statistics.median(result["times_ms"]["model"]), abs=1e-3)
        assert result["speedup"]["model"] == pytest.approx(ms["baseline"] / ms["model"])
        assert result["threads"] == 1
    elif command == "kv":
        model = result["models"]["model"]
        assert model["held_check"]["equal"]
        assert [(r["batch"], r["length"]) for r in model["table"]] == [(1, 4), (2, 4)]
    else:
        assert result["repeats"] == 1 and result["warmup"] == 0
        assert result["ms_per_pass"]["model"] == pytest.approx(result["times_ms"]["model"][0], abs=1e-3)
        assert result["quantize"] is None  # the roofline on this machine's measured peaks, a profile per model
        assert result["roofline"]["machine"]["gflops"] > 0 and "int8_gflops" not in result["roofline"]["machine"]
        assert set(result["profile"]) == set(result["roofline"]["entries"]) == {"model", "baseline"}


def test_cli_bad_threads_is_a_user_error(capsys, tiny_model):
    with mock.patch("slimwhisper.bench.decode.load_for_bench", return_value=tiny_model):
        assert main(["bench", "decode", "X", "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err


@pytest.mark.real
def test_product_owner_check_on_tiny_en(capsys):
    code = main(["bench", "decode", "tiny.en", "--baseline", "tiny.en", "--batch", "2", "--cache-len", "8",
                 "--repeats", "2", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    ms = result["ms_per_token"]
    assert result["speedup"]["model"] == pytest.approx(ms["baseline"] / ms["model"])
    # tiny.en: 4 decoder layers, K and V of 384 numbers in fp32, batch 2, 8 cached tokens
    assert result["cache_bytes"]["model"]["held_self"] == result["cache_bytes"]["baseline"]["held_self"] == (
        4 * 2 * 384 * 4 * 2 * 8)
