"""benchmarks/distill_gap.py: a teacher is at zero distance from itself, a changed decoder is not, and the
figures are the KL and agreement of the labelled positions only."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import benchmark_script, tiny_whisper
from slimwhisper.data import Sample
from slimwhisper.recovery.data import EncoderCache, TrainItem, weights_fingerprint

distill_gap = benchmark_script("distill_gap")


def test_token_gap_counts_only_labelled_positions():
    teacher = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 0.0, 0.0]]])
    student = torch.tensor([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[1, 2, -100]])  # the last position is padding: its disagreement must not count
    kl, agree, positions = distill_gap.token_gap(student, teacher, labels)
    assert positions == 2 and agree == 1
    t, s = torch.log_softmax(teacher[0, 1].double(), -1), torch.log_softmax(student[0, 1].double(), -1)
    assert abs(kl - float((t.exp() * (t - s)).sum())) < 1e-9


def test_a_teacher_is_at_zero_distance_from_itself_and_a_changed_decoder_is_not(tmp_path):
    teacher = tiny_whisper().eval()
    cache = EncoderCache(tmp_path, weights_fingerprint(teacher.get_encoder()))
    items = [TrainItem(Sample(f"u{i}", Path("x.flac"), ""), f"{i:032x}", (1, 5, 6, 7), (-100, 6, 7, 2))
             for i in range(3)]
    for i, item in enumerate(items):
        torch.manual_seed(i)
        cache.put(item.audio_hash, torch.randn(teacher.config.max_source_positions, teacher.config.d_model))
    same = distill_gap.gap(teacher, teacher, items, cache, cache, [100] * 3, pad_id=0)
    assert same["kl_per_token"] < 1e-9 and same["top1_agreement"] == 1.0 and same["tokens"] == 9
    assert same["encoder_error"] == same["encoder_error_audio"] == same["encoder_error_padding"] == 0.0
    student = tiny_whisper().eval()
    with torch.no_grad():
        student.model.decoder.layers[0].fc1.weight.mul_(3.0)
    changed = distill_gap.gap(student, teacher, items, cache, cache, [100] * 3, pad_id=0)
    assert changed["kl_per_token"] > 1e-3


def test_an_encoder_student_reads_its_own_states_and_the_gap_splits_audio_from_padding(tmp_path):
    teacher = tiny_whisper().eval()
    cache, own = EncoderCache(tmp_path, "teacher"), EncoderCache(tmp_path, "student")
    items = [TrainItem(Sample(f"u{i}", Path("x.flac"), ""), f"{i:032x}", (1, 5, 6, 7), (-100, 6, 7, 2))
             for i in range(2)]
    for i, item in enumerate(items):
        torch.manual_seed(i)
        states = torch.randn(teacher.config.max_source_positions, teacher.config.d_model)
        cache.put(item.audio_hash, states)
        changed = states.clone()
        changed[100:] *= 2.0  # the student differs on the padding only: an error of 1 there, 0 on the audio
        own.put(item.audio_hash, changed)
    figures = distill_gap.gap(teacher, teacher, items, cache, own, [100, 100], pad_id=0)
    assert figures["encoder_error_audio"] == 0.0
    assert abs(figures["encoder_error_padding"] - 1.0) < 1e-3
    assert 0.5 < figures["encoder_error"] < 1.0 and figures["kl_per_token"] > 1e-6
