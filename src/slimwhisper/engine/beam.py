"""Batched beam search on the static cache, with the hypothesis bookkeeping of transformers' `generate`.

B audios x `beam_size` rows share one `StaticEncoderDecoderCache`; each step scores all beam x vocabulary
continuations of an audio, keeps the 2 x beam_size best (so at least beam_size are not EOT), moves the
finished ones that rank in the top beam_size into a pool of beam_size hypotheses (score = sum log-prob /
generated length ** length_penalty, EOT counted), continues the best beam_size unfinished ones and reorders
the cache rows in place. An audio stops when its pool is full and its best running beam cannot beat the
worst pooled one (HF's `early_stopping=False` heuristic; `True` and "never" are supported too), and its
rows then leave the batch. Like `generate`, the scores are the log-softmax of the raw logits with the
logit rules' -inf masks applied (not renormalised); the reported `sum_logprob` is renormalised after the
masks, as in greedy decoding and openai-whisper, so temperature-fallback thresholds mean the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .cache import StaticEncoderDecoderCache
from .decode import Decoded, DecoderRunner, prefill
from .rules import LogitRules, TokenIds

HOPELESS = -1.0e9  # HF's score for "no hypothesis here yet" (a finite value, so comparisons stay defined)


def length_normalised(score: torch.Tensor, length: int, length_penalty: float) -> torch.Tensor:
    """A finished hypothesis' ranking score: sum log-prob / length ** length_penalty."""
    return score / (length**length_penalty)


def can_still_improve(
    best_running: torch.Tensor, pool_scores: torch.Tensor, pool_finished: torch.Tensor, length: int, lp: float
) -> torch.Tensor:
    """Per audio [A]: could the best running beam (score [A], `length` tokens) still enter a full pool?

    transformers' heuristic: while a pool slot is empty, yes; otherwise compare the running beam's score
    normalised at its current length with the worst pooled score.
    """
    worst = torch.where(pool_finished, pool_scores.min(dim=1, keepdim=True).values, HOPELESS)
    return (length_normalised(best_running, length, lp)[:, None] > worst).any(dim=1)


@dataclass(frozen=True)
class _Search:
    """The fixed settings of one search, resolved once from the arguments and the generation config."""

    k: int  # beams per audio
    pool_size: int  # finished hypotheses kept per audio
    plen: int  # prompt length
    max_length: int  # total decoder positions, prompt included
    new_max: int  # most tokens a hypothesis can generate
    length_penalty: float
    early_stopping: bool | str


@dataclass
class _Beams:
    """The running beams of the active audios [A, k] and the finished-hypothesis pool of every audio [B, pool]."""

    run_scores: torch.Tensor
    run_renorm: torch.Tensor
    run_tokens: torch.Tensor  # [A, k, new_max]
    pool_scores: torch.Tensor  # sorted by score, best first
    pool_renorm: torch.Tensor
    pool_len: torch.Tensor
    pool_tokens: torch.Tensor  # [B, pool, new_max]
    pool_finished: torch.Tensor
    improvable: torch.Tensor  # [B]
    active: torch.Tensor  # audio of each active row block [A]
    top_k_mask: torch.Tensor  # [2k]: only the top k candidates may finish


class _Candidates(NamedTuple):
    """The 2k best continuations of each active audio at one step."""

    scores: torch.Tensor  # [A, 2k] sum log-probs (masked, not renormalised)
    renorm: torch.Tensor  # [A, 2k] renormalised sum log-probs
    token: torch.Tensor  # [A, 2k]
    parent_row: torch.Tensor  # [A, 2k] flat cache row of the beam each continues
    tokens: torch.Tensor  # [A, 2k, new_max] the whole hypotheses
    finished: torch.Tensor  # [A, 2k] ended by EOT or by the length limit


@torch.inference_mode()
def beam_decode(
    runner: DecoderRunner,
    encoder_out: torch.Tensor,
    prompt: torch.Tensor,
    ids: TokenIds,
    *,
    beam_size: int,
    timestamps: bool = False,
    max_length: int | None = None,
    length_penalty: float | None = None,
    patience: float = 1.0,
    early_stopping: bool | str | None = None,
) -> list[Decoded]:
    """Beam search for a batch that shares one prompt length; the best finished hypothesis per audio.

    Args:
        encoder_out: [B, frames, d]; prompt: [B, P] decoder input ids (previous text, SOT, lang, task, ...).
        max_length: total decoder positions, prompt included (default the model's 448).
        length_penalty: exponent of the length normalisation (default: the generation config's, else 1.0).
        patience: the pool holds round(beam_size * patience) hypotheses (openai-whisper's knob; 1.0 = HF).
        early_stopping: False (HF default heuristic), True (stop once the pool is full) or "never".
    Returns:
        one `Decoded` per audio (tokens without EOT; `extras["score"]` is the length-normalised score).
    """
    _check_beam_args(beam_size, patience)
    batch, plen = prompt.shape
    s = _search_settings(runner, plen, beam_size, max_length, length_penalty, patience, early_stopping)
    k = s.k
    cache, encoder_out, logits, no_speech = _prefill_per_beam(runner, prompt, encoder_out, ids, k)
    rules = LogitRules(ids, logits.shape[-1], batch * k, timestamps=timestamps, device=prompt.device)
    b = _start_beams(batch, s, ids.eot, prompt.device)

    for step in range(s.new_max):
        logprobs = rules.apply(torch.log_softmax(logits.float(), dim=-1))  # [A*k, V], masked, not renormalised
        norm = logprobs.logsumexp(dim=-1)  # renormaliser after the masks
        c = _candidates(b, logprobs, norm, step, s, ids.eot)
        _merge_pool(b, c, step, s)
        next_tokens, rows = _continue_best(b, c, s)
        done = _done_audios(b, step, s)
        if bool(c.finished.all()) or bool(done.all()):
            break
        cache.reorder_cache(rows)
        rules.select_rows(rows)
        rules.advance(next_tokens)
        if bool(done.any()):  # finished audios leave the batch
            encoder_out, next_tokens = _drop_done(b, done, k, cache, rules, encoder_out, next_tokens)
        logits = runner(next_tokens[:, None], cache, encoder_out)

    return _best_hypotheses(b.pool_scores, b.pool_renorm, b.pool_len, b.pool_tokens, no_speech, ids.eot)


def _check_beam_args(beam_size: int, patience: float) -> None:
    """Refuse settings the search cannot honour, before any decoding."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if patience < 1.0:
        raise ValueError(f"patience must be at least 1.0, got {patience}")


def _search_settings(runner: DecoderRunner, plen: int, beam_size: int, max_length: int | None,
                     length_penalty: float | None, patience: float, early_stopping: bool | str | None) -> _Search:
    """The search's settings, with the generation config's defaults filled in as `generate` does."""
    config = runner.model.generation_config
    if length_penalty is None:
        length_penalty = getattr(config, "length_penalty", None)
        length_penalty = 1.0 if length_penalty is None else float(length_penalty)
    if early_stopping is None:
        early_stopping = getattr(config, "early_stopping", None) or False
    max_length = min(max_length or runner.max_positions, runner.max_positions)
    pool_size = max(beam_size, round(beam_size * patience))
    return _Search(beam_size, pool_size, plen, max_length, max_length - plen, length_penalty, early_stopping)


def _prefill_per_beam(runner: DecoderRunner, prompt: torch.Tensor, encoder_out: torch.Tensor, ids: TokenIds,
                      k: int) -> tuple[StaticEncoderDecoderCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill once per audio (all beams share the prompt), then repeat the cache rows per beam; returns the
    cache, the per-beam encoder output and last logits, and P(no speech) per audio."""
    batch = prompt.shape[0]
    cache = runner.new_cache(batch, runner.max_positions, encoder_out.dtype)  # one size: buffers are reused
    logits, no_speech = prefill(runner, prompt, cache, encoder_out, ids)
    per_beam = torch.arange(batch, device=prompt.device).repeat_interleave(k)
    cache.select_rows(per_beam)
    encoder_out = encoder_out.index_select(0, per_beam)  # only its shape matters once cross keys are cached
    return cache, encoder_out, logits.index_select(0, per_beam), no_speech


def _start_beams(batch: int, s: _Search, eot: int, device: torch.device) -> _Beams:
    """Empty pools and k running beams per audio, of which beam 0 alone is live, so the k beams differ."""
    k, pool_size, new_max = s.k, s.pool_size, s.new_max
    run_scores = torch.full((batch, k), HOPELESS, device=device)
    run_scores[:, 0] = 0.0
    return _Beams(
        run_scores=run_scores,
        run_renorm=torch.zeros(batch, k, device=device),
        run_tokens=torch.full((batch, k, new_max), eot, dtype=torch.long, device=device),
        pool_scores=torch.full((batch, pool_size), float("-inf"), device=device),
        pool_renorm=torch.zeros(batch, pool_size, device=device),
        pool_len=torch.zeros(batch, pool_size, dtype=torch.long, device=device),
        pool_tokens=torch.full((batch, pool_size, new_max), eot, dtype=torch.long, device=device),
        pool_finished=torch.zeros(batch, pool_size, dtype=torch.bool, device=device),
        improvable=torch.ones(batch, dtype=torch.bool, device=device),
        active=torch.arange(batch, device=device),
        top_k_mask=torch.arange(2 * k, device=device) < k,
    )


def _candidates(b: _Beams, logprobs: torch.Tensor, norm: torch.Tensor, step: int, s: _Search,
                eot: int) -> _Candidates:
    """Score every beam x vocabulary continuation and keep each audio's 2k best (so at least k are not EOT)."""
    n_active, k, vocab = b.active.numel(), s.k, logprobs.shape[-1]
    cand = (logprobs + b.run_scores.reshape(-1, 1)).reshape(n_active, k * vocab)
    top_scores, top_idx = cand.topk(2 * k, dim=1)  # [A, 2k]
    parent = top_idx // vocab  # beam within the audio
    token = top_idx % vocab
    parent_row = parent + torch.arange(n_active, device=logprobs.device)[:, None] * k  # flat row in the batch
    top_renorm = b.run_renorm.reshape(-1)[parent_row] + logprobs[parent_row, token] - norm[parent_row]
    top_tokens = b.run_tokens.gather(1, parent[..., None].expand(-1, -1, s.new_max)).clone()
    top_tokens[:, :, step] = token
    finished = token == eot
    if s.plen + step + 1 >= s.max_length:
        finished = torch.ones_like(finished)
    return _Candidates(top_scores, top_renorm, token, parent_row, top_tokens, finished)


def _merge_pool(b: _Beams, c: _Candidates, step: int, s: _Search) -> None:
    """Move the newly finished top-k candidates of audios that can still improve into their pools."""
    active, new_max = b.active, s.new_max
    full = b.pool_finished[active].all(dim=1)
    open_ = b.improvable[active] & ~(full & (s.early_stopping is True))
    may_enter = c.finished & b.top_k_mask & open_[:, None]
    entry = torch.where(may_enter, length_normalised(c.scores, step + 1, s.length_penalty), float("-inf"))
    merged = torch.cat([b.pool_scores[active], entry], dim=1)
    keep = merged.topk(s.pool_size, dim=1).indices
    b.pool_scores[active] = merged.gather(1, keep)
    b.pool_renorm[active] = torch.cat([b.pool_renorm[active], c.renorm], dim=1).gather(1, keep)
    lengths = torch.full_like(c.token, step + 1)
    b.pool_len[active] = torch.cat([b.pool_len[active], lengths], dim=1).gather(1, keep)
    b.pool_finished[active] = torch.cat([b.pool_finished[active], may_enter], dim=1).gather(1, keep)
    b.pool_tokens[active] = torch.cat([b.pool_tokens[active], c.tokens], dim=1).gather(
        1, keep[..., None].expand(-1, -1, new_max)
    )


def _continue_best(b: _Beams, c: _Candidates, s: _Search) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the best k unfinished candidates running; returns their next tokens and parent cache rows."""
    running_key = c.scores + c.finished.float() * HOPELESS
    sel = running_key.topk(s.k, dim=1).indices
    b.run_scores = running_key.gather(1, sel)
    b.run_renorm = c.renorm.gather(1, sel)
    b.run_tokens = c.tokens.gather(1, sel[..., None].expand(-1, -1, s.new_max))
    return c.token.gather(1, sel).reshape(-1), c.parent_row.gather(1, sel).reshape(-1)


def _done_audios(b: _Beams, step: int, s: _Search) -> torch.Tensor:
    """Per active audio: has the search for it ended (transformers' stopping rules)?"""
    active, lp = b.active, s.length_penalty
    b.improvable[active] = b.improvable[active] & can_still_improve(
        b.run_scores[:, 0], b.pool_scores[active], b.pool_finished[active], _hyp_length(
            step + 1, s.new_max, s.early_stopping, lp), lp
    )
    return ~b.improvable[active] | (b.pool_finished[active].all(dim=1) & (s.early_stopping is True))


def _drop_done(b: _Beams, done: torch.Tensor, k: int, cache: StaticEncoderDecoderCache, rules: LogitRules,
               encoder_out: torch.Tensor, next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove finished audios' rows from the batch; returns the kept encoder output and next tokens."""
    keep_audio = (~done).nonzero().squeeze(1)
    keep_rows = (keep_audio[:, None] * k + torch.arange(k, device=done.device)).reshape(-1)
    cache.select_rows(keep_rows)
    rules.select_rows(keep_rows)
    b.run_scores, b.run_renorm = b.run_scores[keep_audio], b.run_renorm[keep_audio]
    b.run_tokens = b.run_tokens[keep_audio]
    b.active = b.active[keep_audio]
    return encoder_out.index_select(0, keep_rows), next_tokens[keep_rows]


def _hyp_length(generated: int, new_max: int, early_stopping: bool | str, length_penalty: float) -> int:
    """The length at which a running beam's best possible score is estimated (HF's heuristic)."""
    return new_max if early_stopping == "never" and length_penalty > 0.0 else generated


def _best_hypotheses(scores: torch.Tensor, renorm: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
                     no_speech: torch.Tensor, eot: int) -> list[Decoded]:
    """The top pooled hypothesis of each audio, moved to the CPU once."""
    scores, renorm, lengths, tokens = (t[:, 0].cpu() for t in (scores, renorm, lengths, tokens))
    out = []
    for i in range(scores.shape[0]):
        seq = [t for t in tokens[i, : int(lengths[i])].tolist() if t != eot]
        out.append(Decoded(seq, sum_logprob=float(renorm[i]), no_speech_prob=float(no_speech[i]),
                           extras={"score": float(scores[i])}))
    return out
