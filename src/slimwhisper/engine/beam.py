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

import torch

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
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if patience < 1.0:
        raise ValueError(f"patience must be at least 1.0, got {patience}")
    config = runner.model.generation_config
    if length_penalty is None:
        length_penalty = getattr(config, "length_penalty", None)
        length_penalty = 1.0 if length_penalty is None else float(length_penalty)
    if early_stopping is None:
        early_stopping = getattr(config, "early_stopping", None) or False
    batch, plen = prompt.shape
    device = prompt.device
    max_length = min(max_length or runner.max_positions, runner.max_positions)
    k, pool_size = beam_size, max(beam_size, round(beam_size * patience))
    new_max = max_length - plen

    # Prefill once per audio (all beams share the prompt), then repeat the cache rows per beam.
    cache = runner.new_cache(batch, runner.max_positions, encoder_out.dtype)  # one size: buffers are reused
    logits, no_speech = prefill(runner, prompt, cache, encoder_out, ids)
    per_beam = torch.arange(batch, device=device).repeat_interleave(k)
    cache.select_rows(per_beam)
    encoder_out = encoder_out.index_select(0, per_beam)  # only its shape matters once cross keys are cached
    logits = logits.index_select(0, per_beam)
    rules = LogitRules(ids, logits.shape[-1], batch * k, timestamps=timestamps, device=device)

    # Running beams of the active audios [A, k]; beam 0 alone is live at first, so the k beams differ.
    run_scores = torch.full((batch, k), HOPELESS, device=device)
    run_scores[:, 0] = 0.0
    run_renorm = torch.zeros(batch, k, device=device)
    run_tokens = torch.full((batch, k, new_max), ids.eot, dtype=torch.long, device=device)
    # Finished-hypothesis pool of every audio [B, pool]: sorted by score, best first.
    pool_scores = torch.full((batch, pool_size), float("-inf"), device=device)
    pool_renorm = torch.zeros(batch, pool_size, device=device)
    pool_len = torch.zeros(batch, pool_size, dtype=torch.long, device=device)
    pool_tokens = torch.full((batch, pool_size, new_max), ids.eot, dtype=torch.long, device=device)
    pool_finished = torch.zeros(batch, pool_size, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)  # audio of each active row block
    top_k_mask = torch.arange(2 * k, device=device) < k  # only the top k candidates may finish

    for step in range(new_max):
        n_active = active.numel()
        logprobs = rules.apply(torch.log_softmax(logits.float(), dim=-1))  # [A*k, V], masked, not renormalised
        norm = logprobs.logsumexp(dim=-1)  # renormaliser after the masks
        vocab = logprobs.shape[-1]
        cand = (logprobs + run_scores.reshape(-1, 1)).reshape(n_active, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)  # [A, 2k]
        parent = top_idx // vocab  # beam within the audio
        token = top_idx % vocab
        parent_row = parent + torch.arange(n_active, device=device)[:, None] * k  # flat row in the batch
        top_renorm = run_renorm.reshape(-1)[parent_row] + logprobs[parent_row, token] - norm[parent_row]
        top_tokens = run_tokens.gather(1, parent[..., None].expand(-1, -1, new_max)).clone()
        top_tokens[:, :, step] = token
        finished = token == ids.eot
        if plen + step + 1 >= max_length:
            finished = torch.ones_like(finished)

        # Pool: merge the newly finished top-k candidates of audios that can still improve.
        full = pool_finished[active].all(dim=1)
        open_ = improvable[active] & ~(full & (early_stopping is True))
        may_enter = finished & top_k_mask & open_[:, None]
        entry = torch.where(may_enter, length_normalised(top_scores, step + 1, length_penalty), float("-inf"))
        merged = torch.cat([pool_scores[active], entry], dim=1)
        keep = merged.topk(pool_size, dim=1).indices
        pool_scores[active] = merged.gather(1, keep)
        pool_renorm[active] = torch.cat([pool_renorm[active], top_renorm], dim=1).gather(1, keep)
        lengths = torch.full_like(token, step + 1)
        pool_len[active] = torch.cat([pool_len[active], lengths], dim=1).gather(1, keep)
        pool_finished[active] = torch.cat([pool_finished[active], may_enter], dim=1).gather(1, keep)
        pool_tokens[active] = torch.cat([pool_tokens[active], top_tokens], dim=1).gather(
            1, keep[..., None].expand(-1, -1, new_max)
        )

        # Running beams: the best k unfinished candidates.
        running_key = top_scores + finished.float() * HOPELESS
        sel = running_key.topk(k, dim=1).indices
        run_scores = running_key.gather(1, sel)
        run_renorm = top_renorm.gather(1, sel)
        run_tokens = top_tokens.gather(1, sel[..., None].expand(-1, -1, new_max))
        next_tokens = token.gather(1, sel).reshape(-1)
        rows = parent_row.gather(1, sel).reshape(-1)

        # Stopping (transformers' rules, per audio).
        improvable[active] = improvable[active] & can_still_improve(
            run_scores[:, 0], pool_scores[active], pool_finished[active], _hyp_length(
                step + 1, new_max, early_stopping, length_penalty), length_penalty
        )
        done = ~improvable[active] | (pool_finished[active].all(dim=1) & (early_stopping is True))
        if bool(finished.all()) or bool(done.all()):
            break
        cache.reorder_cache(rows)
        rules.select_rows(rows)
        rules.advance(next_tokens)
        if bool(done.any()):  # finished audios leave the batch
            keep_audio = (~done).nonzero().squeeze(1)
            keep_rows = (keep_audio[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            cache.select_rows(keep_rows)
            rules.select_rows(keep_rows)
            encoder_out = encoder_out.index_select(0, keep_rows)
            next_tokens = next_tokens[keep_rows]
            run_scores, run_renorm, run_tokens = run_scores[keep_audio], run_renorm[keep_audio], run_tokens[keep_audio]
            active = active[keep_audio]
        logits = runner(next_tokens[:, None], cache, encoder_out)

    return _best_hypotheses(pool_scores, pool_renorm, pool_len, pool_tokens, no_speech, ids.eot)


def _hyp_length(generated: int, new_max: int, early_stopping: bool | str, length_penalty: float) -> int:
    """The length at which a running beam's best possible score is estimated (HF's heuristic)."""
    return new_max if early_stopping == "never" and length_penalty > 0.0 else generated


def _best_hypotheses(scores, renorm, lengths, tokens, no_speech, eot: int) -> list[Decoded]:
    """The top pooled hypothesis of each audio, moved to the CPU once."""
    scores, renorm, lengths, tokens = (t[:, 0].cpu() for t in (scores, renorm, lengths, tokens))
    out = []
    for i in range(scores.shape[0]):
        seq = [t for t in tokens[i, : int(lengths[i])].tolist() if t != eot]
        out.append(Decoded(seq, sum_logprob=float(renorm[i]), no_speech_prob=float(no_speech[i]),
                           extras={"score": float(scores[i])}))
    return out
