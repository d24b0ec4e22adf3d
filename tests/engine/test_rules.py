"""engine/rules.py: the logit rules equal transformers' suppress and timestamp processors."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperTimeStampLogitsProcessor,
)

from conftest import EOT, NO_TS, SOT
from slimwhisper.engine.rules import LogitRules, TokenIds


def _hf_processors(config: GenerationConfig, begin: int, timestamps: bool) -> list:
    procs = [
        SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin_index=begin),
        SuppressTokensLogitsProcessor(config.suppress_tokens),
    ]
    if timestamps:
        procs.append(WhisperTimeStampLogitsProcessor(config, begin_index=begin))
    return procs


@pytest.mark.parametrize("timestamps", [False, True])
def test_rules_equal_transformers_processors(timestamps):
    vocab, batch, begin = 120, 6, 2
    config = GenerationConfig(
        eos_token_id=EOT, no_timestamps_token_id=NO_TS, suppress_tokens=[5, 17, 92], begin_suppress_tokens=[EOT, 3],
        max_initial_timestamp_index=10, decoder_start_token_id=SOT,
    )
    ids = TokenIds.from_generation_config(config)
    gen = torch.Generator().manual_seed(0)
    rules = LogitRules(ids, vocab, batch, timestamps=timestamps)
    seqs = torch.full((batch, begin), SOT)
    for step in range(12):
        logits = torch.randn(batch, vocab, generator=gen) * 3
        expected = logits.clone()
        for proc in _hf_processors(config, begin, timestamps):
            expected = proc(seqs, expected)
        got = rules.apply(logits.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), step
        # draw tokens that exercise text, timestamp pairs and EOT (the allowed argmax, or a random allowed one)
        allowed = ~torch.isinf(got)
        pick = torch.multinomial(allowed.float(), 1, generator=gen).squeeze(1)
        rules.advance(pick)
        seqs = torch.cat([seqs, pick[:, None]], dim=1)
    if timestamps:
        assert (seqs[:, begin:] > NO_TS).any() and (seqs[:, begin:] < EOT).any()
