"""recovery/losses.py: distillation, cross-entropy and learning-rate schedules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimwhisper.recovery import lr_factor
from slimwhisper.recovery.losses import IGNORE_INDEX, combined_loss, cross_entropy, distillation, topk_distillation


def test_kd_zero_for_identical_logits_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, 5, IGNORE_INDEX, IGNORE_INDEX]])
    assert distillation(logits, logits.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    # reference: T^2 x the mean over the 5 labelled positions of KL(teacher || student) at temperature 2
    mask = labels != IGNORE_INDEX
    student_logp, teacher_logp = (torch.log_softmax(x[mask] / 2.0, -1) for x in (other, logits))
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    assert kl.shape == (5,) and distillation(other, logits, labels, 2.0).item() == pytest.approx(4 * kl.mean().item())
    # masked positions do not count: changing them changes nothing
    changed = other.clone()
    changed[0, 0] += 100
    assert distillation(changed, logits, labels).item() == pytest.approx(distillation(other, logits, labels).item())
    # the cached top-k form: 0 for the teacher itself, > 0 otherwise, and the full KL when k is the vocabulary
    for k in (3, 11):
        logp, idx = torch.log_softmax(logits / 2.0, -1).topk(k, dim=-1)
        assert topk_distillation(logits, idx, logp, labels, 2.0).item() == pytest.approx(0.0, abs=1e-5)
        # reference: KL over k + 1 buckets (the teacher's top k, then everything else), T^2, mean over positions
        top = idx[mask]
        teacher_p = teacher_logp.exp().gather(-1, top)
        student_p = student_logp.exp().gather(-1, top)
        teacher_b = torch.cat([teacher_p, (1 - teacher_p.sum(-1, keepdim=True)).clamp_min(1e-8)], -1)
        student_b = torch.cat([student_p, (1 - student_p.sum(-1, keepdim=True)).clamp_min(1e-8)], -1)
        bucket_kl = (teacher_b * (teacher_b.log() - student_b.log())).sum(-1).mean()
        assert topk_distillation(other, idx, logp, labels, 2.0).item() == pytest.approx(4 * bucket_kl.item(), rel=1e-4)
    full = distillation(other, logits, labels, 2.0).item()
    assert topk_distillation(other, idx, logp, labels, 2.0).item() == pytest.approx(full, rel=1e-4)
    total, ce, kd = combined_loss(other, labels, (idx, logp), ce_weight=0.5, kd_weight=2.0, temperature=2.0)
    assert total.item() == pytest.approx(0.5 * ce.item() + 2.0 * kd.item(), rel=1e-6)
    assert ce.item() == pytest.approx(cross_entropy(other, labels).item())
    assert ce.item() == pytest.approx(F.cross_entropy(other[mask], labels[mask]).item())  # over labelled tokens only


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "wsd") == 1.0 and lr_factor(89, 100, 10, "wsd") == 1.0
    assert lr_factor(99, 100, 10, "wsd", min_ratio=0.0) == pytest.approx(0.0)
    # wsd decays over the last 10 of 100 steps as 1 - sqrt(progress): halfway (step 94) 0.1 + 0.9 (1 - sqrt 0.5)
    assert lr_factor(94, 100, 10, "wsd") == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))
    # cosine halfway through the steps after warmup: halfway between 1 and min_ratio
    assert lr_factor(55, 101, 10, "cosine") == pytest.approx(0.55)  # step 45 of the 90 after warmup


def test_encoder_distillation_is_relative_per_utterance():
    from slimwhisper.recovery.losses import encoder_distillation

    teacher = torch.randn(2, 30, 8)
    assert float(encoder_distillation(teacher.clone(), teacher)) == 0.0
    off = teacher + 0.1 * torch.randn(2, 30, 8)
    one = float(encoder_distillation(off, teacher))
    assert one > 0
    # scaling an utterance and its error together leaves its term unchanged; the batch sums utterances
    scaled = teacher * torch.tensor([10.0, 1.0])[:, None, None]
    off_scaled = off * torch.tensor([10.0, 1.0])[:, None, None]
    assert float(encoder_distillation(off_scaled, scaled)) == pytest.approx(one, rel=1e-5)
    halves = [float(encoder_distillation(off[i : i + 1], teacher[i : i + 1])) for i in range(2)]
    assert sum(halves) == pytest.approx(one, rel=1e-5)


def test_layerwise_encoder_distillation_averages_each_layers_relative_error():
    from slimwhisper.recovery.losses import encoder_distillation

    teacher = torch.randn(2, 3, 30, 8) * torch.tensor([1.0, 5.0, 50.0])[None, :, None, None]
    student = teacher + 0.1 * torch.randn_like(teacher)
    per_layer = [float(encoder_distillation(student[:, i], teacher[:, i])) for i in range(3)]
    # a layer whose states are 50x larger counts as much as the others: each is relative to its own energy
    assert float(encoder_distillation(student, teacher)) == pytest.approx(sum(per_layer) / 3, rel=1e-5)


def test_encoder_distillation_weighs_frames():
    from slimwhisper.lowrank.calibrate import frame_weights
    from slimwhisper.recovery.losses import encoder_distillation

    teacher = torch.randn(2, 30, 8)
    student = teacher.clone()
    student[:, 10:] += torch.randn(2, 20, 8)  # only the padding after 10 audio frames is off
    assert float(encoder_distillation(student, teacher, torch.ones(2, 30))) == pytest.approx(
        float(encoder_distillation(student, teacher)), rel=1e-6)
    weights = frame_weights([10, 10], 0.8, 30)
    weighted = float(encoder_distillation(student, teacher, weights))
    assert 0 < weighted < float(encoder_distillation(student, teacher))
    # by hand: each utterance's weighted error over its weighted energy
    e, t = (student - teacher).pow(2).sum(-1), teacher.pow(2).sum(-1)
    by_hand = sum(float((w * e[b]).sum() / (w * t[b]).sum()) for b, w in enumerate(weights.float()))
    assert weighted == pytest.approx(by_hand, rel=1e-5)
    # layer-wise states [B, L, T, d] take the same frame weights in every layer
    layers = torch.stack([teacher, 3 * teacher], 1), torch.stack([student, 3 * student], 1)
    assert float(encoder_distillation(layers[1], layers[0], weights)) == pytest.approx(weighted, rel=1e-5)
