"""Whisper's logit rules as precomputed index tensors and a few per-row state tensors.

Equivalent to transformers' `SuppressTokensLogitsProcessor`, `SuppressTokensAtBeginLogitsProcessor` and
`WhisperTimeStampLogitsProcessor` (applied in that order), but applied in place on the [B, V] step
logits: suppression is one `index_fill_` with indices computed once, and the timestamp rules read a
per-row state (last two tokens were timestamps?, last timestamp) updated from each sampled token, so no
step scans the sequence or the vocabulary with `isin`.
"""
from __future__ import annotations

import torch

from ..tokens import TokenIds

NEG_INF = float("-inf")

__all__ = ["LogitRules", "TokenIds"]


class LogitRules:
    """Suppression and timestamp rules for one decode of a batch; call `apply` then `advance` each step."""

    def __init__(self, ids: TokenIds, vocab_size: int, batch: int, *, timestamps: bool, device=None):
        self.ids, self.timestamps, self.vocab_size = ids, timestamps, vocab_size
        self.suppress = torch.tensor(sorted(t for t in ids.suppress if t < vocab_size), dtype=torch.long, device=device)
        begin = sorted(t for t in ids.begin_suppress if t < vocab_size)
        self.begin_suppress = torch.tensor(begin, dtype=torch.long, device=device)
        self.step = 0  # tokens generated so far (the same for every row)
        if timestamps:
            self.ts_begin = ids.timestamp_begin
            self.ts_ids = torch.arange(self.ts_begin, vocab_size, device=device)  # [V_ts]
            self.last_ts = torch.zeros(batch, dtype=torch.bool, device=device)
            self.penult_ts = torch.ones(batch, dtype=torch.bool, device=device)  # "fewer than 2 tokens" counts as True
            self.last_ts_token = torch.full((batch,), -1, dtype=torch.long, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask the step logits [B, V] in place (and return them)."""
        if self.step == 0 and self.begin_suppress.numel():
            logits.index_fill_(1, self.begin_suppress, NEG_INF)
        if self.suppress.numel():
            logits.index_fill_(1, self.suppress, NEG_INF)
        if self.timestamps:
            self._apply_timestamps(logits)
        return logits

    def _apply_timestamps(self, logits: torch.Tensor) -> None:
        tb, eot = self.ts_begin, self.ids.eot
        logits[:, self.ids.no_timestamps] = NEG_INF
        if self.step > 0:
            logits[:, tb:].masked_fill_((self.last_ts & self.penult_ts).unsqueeze(1), NEG_INF)  # pair closed: text
            logits[:, :eot].masked_fill_((self.last_ts & ~self.penult_ts).unsqueeze(1), NEG_INF)  # open: no text
            seen = self.last_ts_token >= 0
            keep_last = self.last_ts & ~self.penult_ts
            floor = torch.where(seen, self.last_ts_token + (~keep_last).long(), torch.full_like(self.last_ts_token, tb))
            logits[:, tb:].masked_fill_(self.ts_ids.unsqueeze(0) < floor.unsqueeze(1), NEG_INF)  # monotonic
        else:
            logits[:, :tb] = NEG_INF  # the first token is a timestamp
            if self.ids.max_initial_timestamp_index is not None:
                logits[:, tb + self.ids.max_initial_timestamp_index + 1 :] = NEG_INF
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ts_logprob = logprobs[:, tb:].logsumexp(dim=-1)
        text_logprob = logprobs[:, :tb].max(dim=-1).values
        logits[:, :tb].masked_fill_((ts_logprob > text_logprob).unsqueeze(1), NEG_INF)

    def advance(self, tokens: torch.Tensor) -> None:
        """Record the tokens [B] just chosen."""
        if self.timestamps:
            is_ts = tokens >= self.ts_begin
            self.penult_ts = self.last_ts if self.step > 0 else torch.ones_like(is_ts)
            self.last_ts = is_ts
            self.last_ts_token = torch.where(is_ts, tokens, self.last_ts_token)
        self.step += 1

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep the state of `rows` only (rows leave the batch, or beams are reordered)."""
        if self.timestamps:
            self.last_ts, self.penult_ts = self.last_ts[rows], self.penult_ts[rows]
            self.last_ts_token = self.last_ts_token[rows]
