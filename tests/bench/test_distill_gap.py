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
    same = distill_gap.gap(teacher, teacher, items, cache, pad_id=0)
    assert same["kl_per_token"] < 1e-9 and same["top1_agreement"] == 1.0 and same["tokens"] == 9
    student = tiny_whisper().eval()
    with torch.no_grad():
        student.model.decoder.layers[0].fc1.weight.mul_(3.0)
    changed = distill_gap.gap(student, teacher, items, cache, pad_id=0)
    assert changed["kl_per_token"] > 1e-3
