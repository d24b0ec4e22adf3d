"""`slimwhisper finetune`: bad input exits 2 with one line."""
from __future__ import annotations

import pytest

import slimwhisper as sw
from conftest import tiny_pair, write_clips
from slimwhisper.cli import main
from slimwhisper.loading.processor import save_processor


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors(capsys, tmp_path):
    manifest = write_clips(tmp_path / "data", n=2)
    # a compressed model with no recorded original and KD on
    model, processor = tiny_pair(False)
    converted = sw.convert(model, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    converted.config.slimwhisper_source = None
    lost = tmp_path / "lost"
    converted.save_pretrained(lost)
    save_processor(processor, lost)
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(manifest), "--out", str(tmp_path / "o1"))
    assert code == 2 and "--teacher" in err
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(tmp_path / "nope.jsonl"), "--out",
                       str(tmp_path / "o2"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "finetune", str(lost), "--train", str(manifest), "--out", str(tmp_path / "o3"),
                       "--batch-size", "6", "--micro-batch-size", "4")
    assert code == 2 and "multiple" in err


def test_low_rank_encoder_gets_its_recipe_unless_told_otherwise():
    import argparse

    from slimwhisper.cli import build_parser
    from slimwhisper.recovery.cli import config_from_args
    from slimwhisper.recovery.config import LOWRANK_ENCODER_RECIPE, FinetuneConfig

    parser = build_parser()

    def config(*extra: str, compression=None) -> FinetuneConfig:
        args = parser.parse_args(["finetune", "m", "--train", "t", "--out", "o", *extra])
        assert isinstance(args, argparse.Namespace)
        return config_from_args(args, compression)

    plain = config()
    assert plain == FinetuneConfig()
    lowrank = config(compression={"lowrank": {"layers": {}}})
    assert {k: getattr(lowrank, k) for k in LOWRANK_ENCODER_RECIPE} == LOWRANK_ENCODER_RECIPE
    assert lowrank.encoder_weight > 0 and lowrank.scope == "converted"
    told = config("--lr", "5e-5", "--scope", "all", compression={"lowrank": {"layers": {}}})
    assert (told.lr, told.scope, told.encoder_weight) == (5e-5, "all", LOWRANK_ENCODER_RECIPE["encoder_weight"])
    assert config("--encoder-weight", "0", compression={"lowrank": {}}).encoder_weight == 0.0
    assert config(compression={"mla": {}}) == FinetuneConfig()
    assert lowrank.steps < plain.steps and config("--steps", "50", compression={"lowrank": {}}).steps == 50
    assert not plain.embeddings and config("--embeddings").embeddings and not config("--no-embeddings").embeddings
    assert config("--encoder-layers", "all", compression={"lowrank": {}}).encoder_layers == "all"
    with pytest.raises(SystemExit):  # argparse's own one-line error
        config("--encoder-layers", "some")
    assert lowrank.encoder_audio_weight == FinetuneConfig().encoder_audio_weight == 0.8
    assert config("--encoder-audio-weight", "none").encoder_audio_weight is None
    assert config("--encoder-audio-weight", "0.5").encoder_audio_weight == 0.5
    for bad in ("0", "2", "most"):
        with pytest.raises(SystemExit):
            config("--encoder-audio-weight", bad)
