"""recovery/pipeline.py: `finetune` end to end with a control arm, its record, and reruns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimwhisper as sw
from conftest import tiny_pair, write_clips
from slimwhisper.cli import main
from slimwhisper.loading.processor import save_processor
from slimwhisper.recovery.train import converted_paths


def saved_pair(tmp_path: Path) -> tuple[Path, Path]:
    """An 'original' HF directory and its MLA conversion, saved as the convert command would."""
    original_dir, slim_dir = tmp_path / "orig", tmp_path / "slim"
    model, processor = tiny_pair(False)
    model.save_pretrained(original_dir)
    save_processor(processor, original_dir)
    loaded, processor = sw.load(original_dir)  # records slimwhisper_source (name, sha256)
    converted = sw.convert(loaded, sw.MLAConfig(kv_reduction=0.75, factorization="joint"))
    converted.save_pretrained(slim_dir)
    save_processor(processor, slim_dir)
    return original_dir, slim_dir


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_model_and_control(capsys, tmp_path):
    _, slim_dir = saved_pair(tmp_path)
    manifest = write_clips(tmp_path / "data", n=4)
    out = tmp_path / "run"
    argv = ["finetune", str(slim_dir), "--train", str(manifest), "--control", "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--micro-batch-size", "2", "--warmup-steps", "0", "--cache-dir",
            str(tmp_path / "cache"), "--ce-weight", "1", "--quiet"]  # cross-entropy: the control has something to learn
    code, text, err = cli(capsys, *argv)
    assert code == 0, err
    printed = json.loads(text)
    assert set(printed["arms"]) == {"model", "control"}
    record = json.loads((out / "finetune.json").read_text())
    assert record["arms"]["model"]["steps_done"] == 2 and record["teacher"]["checked"]
    assert (out / "loss.png").is_file() and (out / "work" / "control" / "loss.csv").is_file()
    model, _ = sw.load(out / "model")
    control, _ = sw.load(out / "control")
    slim_config = json.loads((slim_dir / "config.json").read_text())
    assert model.config.compression == slim_config["compression"]
    assert "mla" not in (getattr(control.config, "compression", None) or {})
    # the default scope trains the modules the conversion replaced, in both arms, and nothing else
    original, _ = sw.load(tmp_path / "orig")
    changed = {n for n, p in control.named_parameters() if not torch.equal(p, original.state_dict()[n])}
    paths = tuple(p + "." for p in converted_paths(model.config))
    assert paths and changed and all(n.startswith(paths) for n in changed)
    code, _, err = cli(capsys, "info", str(out / "model"), "--json")
    assert code == 0, err
    # the same command again: nothing is retrained
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    # another recipe in the same directory is refused
    code, _, err = cli(capsys, *[a if a != "2" else "3" for a in argv])
    assert code == 2 and "other settings" in err


def test_a_run_recorded_before_a_recipe_field_existed_still_resumes(tmp_path):
    """finetune.json written before `encoder_weight` existed names the same recipe (its default then)."""
    from slimwhisper.errors import SlimWhisperError
    from slimwhisper.recovery.config import FinetuneConfig
    from slimwhisper.recovery.pipeline import RUN_FILE, _read_record

    identity = {"model": "m", "train": "t", "config": FinetuneConfig().to_dict(), "control": True, "teacher": None}
    older = {**identity, "config": {k: v for k, v in identity["config"].items() if k != "encoder_weight"}}
    (tmp_path / RUN_FILE).write_text(json.dumps({"identity": older, "arms": {"model": {"finished": True}}}))
    assert _read_record(tmp_path, tmp_path / RUN_FILE, identity)["arms"] == {"model": {"finished": True}}
    other = {**identity, "config": FinetuneConfig(encoder_weight=1.0).to_dict()}
    with pytest.raises(SlimWhisperError, match="other settings"):
        _read_record(tmp_path, tmp_path / RUN_FILE, other)
    # before `embeddings` existed every run trained them: such a record resumes only a run that does too
    before = {**identity, "config": {k: v for k, v in identity["config"].items() if k != "embeddings"}}
    (tmp_path / RUN_FILE).write_text(json.dumps({"identity": before, "arms": {}}))
    trains_them = {**identity, "config": FinetuneConfig(embeddings=True).to_dict()}
    assert _read_record(tmp_path, tmp_path / RUN_FILE, trains_them)["identity"] == before
    with pytest.raises(SlimWhisperError, match="other settings"):
        _read_record(tmp_path, tmp_path / RUN_FILE, identity)
    # before `encoder_audio_weight` existed encoder distillation weighed every frame alike; a run without
    # encoder distillation is the same recipe either way
    distils = {**identity, "config": FinetuneConfig(encoder_weight=1.0).to_dict()}
    for recorded, resumes, refuses in ((distils, FinetuneConfig(encoder_weight=1.0, encoder_audio_weight=None),
                                        FinetuneConfig(encoder_weight=1.0)), (identity, FinetuneConfig(), None)):
        config = {k: v for k, v in recorded["config"].items() if k != "encoder_audio_weight"}
        (tmp_path / RUN_FILE).write_text(json.dumps({"identity": {**recorded, "config": config}, "arms": {}}))
        _read_record(tmp_path, tmp_path / RUN_FILE, {**identity, "config": resumes.to_dict()})
        if refuses is not None:
            with pytest.raises(SlimWhisperError, match="other settings"):
                _read_record(tmp_path, tmp_path / RUN_FILE, {**identity, "config": refuses.to_dict()})
