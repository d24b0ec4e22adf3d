"""Shared by every compression method: build the compressed model from its config and load strictly."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .configuration import SlimWhisperConfig
from .modeling import SlimWhisperForConditionalGeneration


def rebuild(
    model: nn.Module, compression: dict[str, Any], new_state: dict[str, torch.Tensor], replaced: tuple[str, ...]
) -> SlimWhisperForConditionalGeneration:
    """Build the compressed model from its config (as `from_pretrained` would) and load weights strictly.

    `compression` is merged into the model's existing compression dict, so methods compose; the
    state of every module named in `replaced` is dropped and `new_state` supplies the new tensors.
    The result owns its tensors (nothing is shared with `model`).
    """
    config = SlimWhisperConfig.from_whisper(model.config, compression)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        new = SlimWhisperForConditionalGeneration(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(p + "." for p in replaced))}
    state.update(new_state)
    # own copies: the compressed model must not share storage with `model` (training it in place would
    # otherwise also train the original, e.g. the distillation teacher)
    state = {k: v.detach().clone() for k, v in state.items()}
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
