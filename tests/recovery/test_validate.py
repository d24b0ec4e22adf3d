"""recovery/validate.py and the check `finetune` makes with it: the distance to the original is zero for the
original itself, grows with a change, counts labelled positions only, splits the encoder error into audio and
padding; an arm that training moved away from the original on the validation audio is saved untrained."""
from __future__ import annotations

import json

import pytest
import torch

import slimwhisper as sw
from conftest import tiny_pair, write_clips
from recovery.test_pipeline import cli, saved_pair
from slimwhisper.errors import SlimWhisperError
from slimwhisper.recovery.pipeline import validation_source
from slimwhisper.recovery.validate import distance, encoder_gap, token_gap, validation_set


def test_token_gap_counts_only_labelled_positions():
    teacher = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 0.0, 0.0]]])
    student = torch.tensor([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[1, 2, -100]])  # the last position is padding: its disagreement must not count
    kl, agree, positions = token_gap(student, teacher, labels)
    assert positions == 2 and agree == 1
    t, s = torch.log_softmax(teacher[0, 1].double(), -1), torch.log_softmax(student[0, 1].double(), -1)
    assert abs(kl - float((t.exp() * (t - s)).sum())) < 1e-9


def test_encoder_gap_splits_audio_from_padding():
    torch.manual_seed(0)
    teacher = torch.randn(2, 300, 8)
    student = teacher.clone()
    student[:, 100:] *= 2.0  # differs on the padding only: an error of 1 there, 0 on the audio
    rows = encoder_gap(student, teacher, [100, 100])
    assert torch.equal(rows[:, 1], torch.zeros(2))
    assert torch.allclose(rows[:, 2], torch.ones(2, dtype=torch.float64))
    assert bool(((rows[:, 0] > 0.5) & (rows[:, 0] < 1.0)).all())


def test_the_original_is_at_zero_distance_and_a_changed_model_is_not(tmp_path):
    teacher, processor = tiny_pair(False)
    validation = validation_set(teacher, processor, write_clips(tmp_path / "v", n=3), cache_dir=tmp_path / "c")
    assert len(validation.items) == 3 and validation.tokens > 0 and len(validation.audio) == 3
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    same = distance(teacher, teacher, validation, processor.feature_extractor, pad)
    assert same["kl_per_token"] < 1e-9 and same["top1_agreement"] == 1.0 and same["encoder_error"] == 0.0
    spread = validation_set(teacher, processor, write_clips(tmp_path / "w", n=5), max_clips=2)
    assert [it.sample.id for it in spread.items] == ["c0", "c2"]
    student, _ = tiny_pair(False)
    with torch.no_grad():
        student.model.encoder.layers[0].fc1.weight.mul_(3.0)
        student.model.decoder.layers[0].fc1.weight.mul_(3.0)
    changed = distance(student, teacher, validation, processor.feature_extractor, pad)
    assert changed["kl_per_token"] > 1e-4 and changed["encoder_error_audio"] > 1e-4


def test_validation_source_auto_reads_the_recorded_calibration(tmp_path):
    audio = write_clips(tmp_path / "cal", n=2)
    recorded = {"lowrank": {"calibration": str(audio)}}
    assert validation_source("auto", recorded)[0] == str(audio)
    assert validation_source("none", recorded)[0] is None
    assert validation_source("auto", {"lowrank": {"calibration": str(tmp_path / "gone.jsonl")}})[0] is None
    assert validation_source("auto", {"mla": {}})[0] is None
    assert validation_source(str(audio), None) == (str(audio), "given")
    with pytest.raises(SlimWhisperError, match="does not exist"):
        validation_source(str(tmp_path / "missing.jsonl"), None)


def _finetune(capsys, slim_dir, out, manifest, validation, lr):
    argv = ["finetune", str(slim_dir), "--train", str(manifest), "--out", str(out), "--steps", "3", "--batch-size",
            "2", "--warmup-steps", "0", "--lr", lr, "--cache-dir", str(out.parent / "cache"), "--quiet",
            "--validation", validation]
    code, text, err = cli(capsys, *argv)
    assert code == 0, err
    return json.loads(text)["arms"]["model"], err


def test_an_arm_that_training_moved_away_is_saved_untrained(capsys, caplog, tmp_path):
    _, slim_dir = saved_pair(tmp_path)
    train = write_clips(tmp_path / "train", n=4)
    held = write_clips(tmp_path / "held", n=3, seconds=0.9)
    # a learning rate far too high: three steps throw the converted modules far from the original
    arm, _ = _finetune(capsys, slim_dir, tmp_path / "wild", train, str(held), "1")
    check = arm["validation"]
    assert check["kept"] == "untrained" and check["after"]["kl_per_token"] > check["before"]["kl_per_token"]
    assert "keeping the untrained weights" in caplog.text
    saved, untrained = sw.load(tmp_path / "wild" / "model")[0], sw.load(slim_dir)[0]
    assert all(torch.equal(p, untrained.state_dict()[n]) for n, p in saved.state_dict().items())
    record = json.loads((tmp_path / "wild" / "finetune.json").read_text())
    assert record["validation"] == {"data": str(held), "why": "given"}
    # without the check the same run keeps what it trained
    arm, _ = _finetune(capsys, slim_dir, tmp_path / "kept", train, "none", "1")
    assert arm["validation"] is None
    trained = sw.load(tmp_path / "kept" / "model")[0]
    assert not all(torch.equal(p, untrained.state_dict()[n]) for n, p in trained.state_dict().items())


def test_a_missing_validation_set_is_one_line(capsys, tmp_path):
    _, slim_dir = saved_pair(tmp_path)
    code, _, err = cli(capsys, "finetune", str(slim_dir), "--train", str(write_clips(tmp_path / "t", n=2)), "--out",
                       str(tmp_path / "o"), "--validation", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "validation data" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


def test_recorded_calibration_that_is_not_a_dataset_turns_the_check_off(capsys, caplog, tmp_path):
    """A model calibrated on one audio file still fine-tunes: the check is skipped, with a warning."""
    _, slim_dir = saved_pair(tmp_path)
    one_file = write_clips(tmp_path / "one", n=1).parent / "c0.wav"
    config = json.loads((slim_dir / "config.json").read_text())
    config["compression"]["lowrank"] = {"calibration": str(one_file)}  # only the record matters here
    (slim_dir / "config.json").write_text(json.dumps(config))
    # --encoder-weight 0: the MLA model has no low-rank encoder to distil, whatever its record says
    argv = ["finetune", str(slim_dir), "--train", str(write_clips(tmp_path / "t", n=2)), "--out", str(tmp_path / "o"),
            "--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--cache-dir", str(tmp_path / "cache"),
            "--encoder-weight", "0", "--quiet"]
    code, text, err = cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(text)["arms"]["model"]["validation"] is None
    assert "cannot serve as validation data" in caplog.text
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["validation"]["data"] is None
