"""Statistics of attention inputs on calibration audio, for activation-aware MLA conversion.

For every target attention module we accumulate, over the token/frame rows that actually occur
(decoder positions after the first end-of-text are ignored):
  * the second moment E[x x^T] of the input to k_proj/v_proj (decoder hidden states for self
    attention, the encoder output for cross attention, encoder hidden states for encoder attention),
    in float64, streamed: memory does not grow with the amount of audio;
  * the mean |q_i| and |k_i| of every query/key dim, for the "2norm" kept-dim selection.
Decoder token sequences come from the model's own greedy transcription of the audio, so no
transcripts are needed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class AttentionStats:
    """Running sums for one attention module (float64)."""

    kv_moment: torch.Tensor  # [d, d] sum of x x^T over kv-input rows
    q_abs: torch.Tensor  # [d] sum of |q| over query rows
    k_abs: torch.Tensor  # [d] sum of |k| over kv-input rows
    kv_rows: int = 0
    q_rows: int = 0

    @classmethod
    def zeros(cls, d_model: int) -> AttentionStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(d_model, d_model), z(d_model), z(d_model))

    def second_moment(self) -> torch.Tensor:
        return self.kv_moment / max(self.kv_rows, 1)

    def qk_score(self, num_heads: int) -> torch.Tensor:
        """E|q_i| * E|k_i| per head and dim [H, h]: how much each key dim contributes to the scores."""
        score = (self.q_abs / max(self.q_rows, 1)) * (self.k_abs / max(self.kv_rows, 1))
        return score.view(num_heads, -1)


@dataclass
class _Recording:
    """Shared by the hooks: whether to record now, and which decoder positions are real tokens [B, L]."""

    active: bool = False
    mask: torch.Tensor | None = field(default=None)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten [B, T, d] to the [N, d] rows selected by `mask` (all rows when mask is None)."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def _make_hook(module: nn.Module, stats: AttentionStats, recording: _Recording, kind: str):
    def hook(_module, args, kwargs):
        if not recording.active:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        kv_input = kwargs.get("key_value_states")
        if kv_input is None:
            kv_input = hidden
        q_mask = None if kind == "encoder_self" else recording.mask
        kv_mask = q_mask if kind == "decoder_self" else None
        x = _rows(kv_input, kv_mask).double()
        stats.kv_moment += x.T @ x
        stats.kv_rows += x.shape[0]
        stats.k_abs += module.k_proj(_rows(kv_input, kv_mask)).abs().double().sum(0)
        stats.q_abs += module.q_proj(_rows(hidden, q_mask)).abs().double().sum(0)
        stats.q_rows += int(q_mask.sum()) if q_mask is not None else hidden.shape[0] * hidden.shape[1]

    return hook


def valid_token_mask(sequences: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True for every position up to and including the first end-of-text token of each row."""
    is_eos = (sequences == eos_token_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


@torch.no_grad()
def collect_attention_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    targets: dict[str, tuple[nn.Module, str]],
    max_new_tokens: int = 128,
    progress: bool = True,
) -> dict[str, AttentionStats]:
    """Run the unmodified model over calibration features and return stats per target name.

    Args:
        model: a Whisper model with a generation config (the engine transcribes the audio greedily with it).
        batches: log-mel feature batches [B, n_mels, 3000].
        targets: name -> (attention module, kind) with kind in decoder_self/decoder_cross/encoder_self.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stats = {name: AttentionStats.zeros(module.embed_dim) for name, (module, _) in targets.items()}
    recording = _Recording()
    handles = [
        module.register_forward_pre_hook(_make_hook(module, stats[name], recording, kind), with_kwargs=True)
        for name, (module, kind) in targets.items()
    ]
    from ..engine.decode import DecoderRunner

    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    was_training = model.training
    model.eval()
    runner = DecoderRunner(model)  # transcribes; the hooks record only the teacher-forced pass below
    try:
        for features in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            features = features.to(device=device, dtype=dtype)
            # The encoder runs once per batch (it is most of the cost); encoder hooks record here.
            recording.active, recording.mask = True, None
            encoded = model.get_encoder()(features)
            recording.active = False
            sequences = _transcribe(runner, encoded, max_new_tokens)
            recording.active, recording.mask = True, valid_token_mask(sequences, eos)
            model(encoder_outputs=encoded, decoder_input_ids=sequences, use_cache=False)
            recording.active = False
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for s in stats.values():
        s.kv_moment = s.kv_moment.cpu()
        s.q_abs, s.k_abs = s.q_abs.cpu(), s.k_abs.cpu()
    return stats


def _transcribe(runner, encoded, max_new_tokens: int) -> torch.Tensor:
    """Greedy token sequences for a batch from the engine (`DecoderRunner`): decoder prompt (SOT, language,
    task, ...), text and EOT, right-padded with EOT."""
    from ..engine.decode import greedy_transcripts

    max_new_tokens = min(max_new_tokens, runner.max_positions - 8)  # room for the prompt
    rows = greedy_transcripts(runner, encoded.last_hidden_state, max_new_tokens)
    eot = rows[0][-1]
    length = max(len(r) for r in rows)
    hidden = encoded.last_hidden_state
    return torch.tensor([r + [eot] * (length - len(r)) for r in rows], dtype=torch.long, device=hidden.device)


@torch.no_grad()
def logit_sensitivity(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    targets: dict[str, tuple[nn.Module, str]],
    replacements: dict[str, tuple[torch.Tensor, torch.Tensor]],
    max_new_tokens: int = 128,
) -> dict[str, float]:
    """Mean KL(original || changed) of the next-token distribution per real decoder token, per module.

    Each module in turn gets the (k_proj, v_proj) weights of `replacements` while all others stay
    original, on the model's own greedy transcripts of the calibration audio. That measures what a
    reconstruction error in that module does to the output, which its local error alone cannot tell
    (an early decoder layer's error travels through every later one). Weights are restored after.
    """
    from ..engine.decode import DecoderRunner

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    was_training = model.training
    model.eval()
    runner = DecoderRunner(model)
    data = []
    for features in batches:
        features = features.to(device=device, dtype=dtype)
        encoded = model.get_encoder()(features)
        sequences = _transcribe(runner, encoded, max_new_tokens)
        ref = model(encoder_outputs=encoded, decoder_input_ids=sequences, use_cache=False).logits.float()
        data.append((features, encoded, sequences, valid_token_mask(sequences, eos), ref.log_softmax(-1)))
    result = {}
    try:
        for name, (module, kind) in targets.items():
            saved = module.k_proj.weight.data, module.v_proj.weight.data
            module.k_proj.weight.data, module.v_proj.weight.data = (t.to(saved[0]) for t in replacements[name])
            try:
                total, count = 0.0, 0
                for features, encoded, sequences, mask, ref in data:
                    enc = model.get_encoder()(features) if kind == "encoder_self" else encoded
                    out = model(encoder_outputs=enc, decoder_input_ids=sequences, use_cache=False).logits.float()
                    kl = (ref.exp() * (ref - out.log_softmax(-1))).sum(-1)
                    total, count = total + float(kl[mask].sum()), count + int(mask.sum())
            finally:
                module.k_proj.weight.data, module.v_proj.weight.data = saved
            result[name] = total / max(count, 1)
    finally:
        model.train(was_training)
    return result
