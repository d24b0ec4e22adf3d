"""Narrow heads: encoder self-attention with fewer dimensions per head, for scores and for values.

Low-rank linears leave the attention's L^2 terms (scores q·k and the weighted sum of values over 1500
frames) as they were; on base they are about a third of the encoder's work. `narrow_heads` gives each
head of chosen layers `dim` < head_dim dimensions: the query/key maps keep the scores closest and the
value/output maps keep each head's output closest on the calibration statistics (`math.score_maps`,
`math.value_maps`), which act on the last linear of q, k, v (dense or the `up` of a pair) and the first
of out (dense or `down`). A pair that no longer saves multiplies at the narrower width is folded into one
dense linear. Which layers narrow, and how far, follows the encoder-output error each layer's narrowing
causes alone on calibration windows, per dimension given up, until the layers keep `attention_budget`
of their summed head dims (`math.greedy_head_dims`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import EncoderStats, _layer_inputs, _tail, weighted_error
from .math import fixed_rank, greedy_head_dims, head_dim_options, score_maps, value_maps
from .modules import LowRankLinear, WhisperLowRankAttention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def head_moments(stats: EncoderStats, name: str, heads: int) -> torch.Tensor:
    """Per-head second moments [heads, head_dim, head_dim] of a projection's outputs, uncentred: a bias is
    part of what the scores and values carry."""
    layer = stats.layers[name]
    moment = layer.gram / max(layer.rows, 1e-30)
    size = moment.shape[0] // heads
    return torch.stack([moment[h * size:(h + 1) * size, h * size:(h + 1) * size] for h in range(heads)])


def layer_moments(stats: EncoderStats, attention: str, heads: int) -> dict[str, torch.Tensor]:
    """{"q", "k", "v"}: the per-head moments of one attention's projections (`attention` is its fqn; the recipe
    keeps q, k and v among the targets and `convert` checks the statistics cover them)."""
    return {p[0]: head_moments(stats, f"{attention}.{p}", heads) for p in PROJECTIONS[:3]}


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy: the maps are computed where the statistics are."""
    return tensor.detach().to("cpu", torch.float64)


def _last(module: nn.Module) -> nn.Linear:
    return module.up if isinstance(module, LowRankLinear) else module


def _first(module: nn.Module) -> nn.Linear:
    return module.down if isinstance(module, LowRankLinear) else module


def _head_maps(attn: WhisperLowRankAttention | nn.Module, dim: int,
               moments: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-diagonal A_q, A_k, A_v [heads x dim, heads x head_dim] and the out projection's first linear's
    new weight [rows, heads x dim]."""
    heads, size = attn.num_heads, attn.head_dim
    scores = [score_maps(moments["q"][h], moments["k"][h], dim) for h in range(heads)]
    first_out = _f64(_first(attn.out_proj).weight)
    values = [value_maps(first_out[:, h * size:(h + 1) * size], moments["v"][h], dim) for h in range(heads)]
    return (torch.block_diag(*[a for a, _ in scores]), torch.block_diag(*[b for _, b in scores]),
            torch.block_diag(*[a for a, _ in values]), torch.cat([b for _, b in values], dim=1))


def _narrowed_weights(attn: nn.Module, dim: int, moments: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """name -> (first weight, last weight, last bias) of each projection narrowed, float64; first is None for a
    dense projection."""
    a_q, a_k, a_v, out_first = _head_maps(attn, dim, moments)
    parts: dict[str, Any] = {}
    for name, a in (("q_proj", a_q), ("k_proj", a_k), ("v_proj", a_v)):
        module = getattr(attn, name)
        last = _last(module)
        bias = None if last.bias is None else a @ _f64(last.bias)
        first = _f64(module.down.weight) if isinstance(module, LowRankLinear) else None
        parts[name] = (first, a @ _f64(last.weight), bias)
    out = attn.out_proj
    if isinstance(out, LowRankLinear):
        parts["out_proj"] = (out_first, _f64(out.up.weight), _f64(out.up.bias))
    else:
        parts["out_proj"] = (None, out_first, None if out.bias is None else _f64(out.bias))
    return parts


def narrowed_attention(attn: nn.Module, dim: int, moments: Mapping[str, torch.Tensor]) -> WhisperLowRankAttention:
    """A new `WhisperLowRankAttention` like `attn` with `dim` dimensions per head and its narrowed weights; a
    low-rank pair that no longer saves multiplies at the new width is folded into one dense linear."""
    like = next(attn.parameters())
    new = WhisperLowRankAttention.like(attn, {})
    new.narrow(dim)
    state: dict[str, torch.Tensor] = {}
    for name, (first, last, bias) in _narrowed_weights(attn, dim, moments).items():
        d_in = first.shape[1] if first is not None else last.shape[1]
        rank = None if first is None else fixed_rank(first.shape[0], d_in, last.shape[0])
        if rank is not None:
            setattr(new, name, LowRankLinear(d_in, last.shape[0], rank))
            state.update({f"{name}.down.weight": first, f"{name}.up.weight": last})
            state[f"{name}.up.bias"] = bias if bias is not None else torch.zeros(last.shape[0], dtype=last.dtype)
            continue
        state[f"{name}.weight"] = last if first is None else last @ first
        if getattr(new, name).bias is not None:
            state[f"{name}.bias"] = bias if bias is not None else torch.zeros(last.shape[0], dtype=last.dtype)
        # a dense k_proj has no bias: a constant added to every key moves each query's scores alike,
        # which the softmax ignores
    new.load_state_dict({k: v.to(like.dtype) for k, v in state.items()}, strict=True)
    return new.to(like.device).train(attn.training)


@torch.no_grad()
def probe_head_errors(model: nn.Module, moments: Mapping[int, Mapping[str, torch.Tensor]], features: torch.Tensor,
                      weights: torch.Tensor | None, granule: int, progress: bool = True) -> dict[int, dict[int, float]]:
    """layer -> {head dim: weighted error of the encoder output with that layer alone narrowed to it}, against
    the model's own output on `features` (the layers before it are unchanged, so each probe runs the tail)."""
    encoder = model.get_encoder()
    inputs, output = _layer_inputs(encoder, features)
    errors: dict[int, dict[int, float]] = {}
    options = {i: head_dim_options(layer.self_attn.head_dim, granule) for i, layer in enumerate(encoder.layers)}
    with tqdm(total=sum(len(o) for o in options.values()), desc="probing head dims", unit="probe",
              disable=not progress) as bar:
        for i, layer in enumerate(encoder.layers):
            original = layer.self_attn
            errors[i] = {}
            for dim in options[i]:
                layer.self_attn = narrowed_attention(original, dim, moments[i])
                try:
                    errors[i][dim] = weighted_error(_tail(encoder, inputs[i], i), output, weights)
                finally:
                    layer.self_attn = original
                bar.update()
    return errors


def linear_cost(module: nn.Module) -> int:
    """Multiplies per row of a dense or low-rank linear."""
    if isinstance(module, LowRankLinear):
        return module.rank * (module.in_features + module.out_features)
    return module.in_features * module.out_features


def choose_head_dims(model: nn.Module, stats: EncoderStats, budget: float, features: torch.Tensor,
                     weights: torch.Tensor | None, granule: int, progress: bool = True) -> dict[str, int]:
    """attention fqn -> narrowed head dim for the layers that narrow under `budget` (share of the summed head
    dims kept), from the encoder-output errors measured on `features`."""
    layers = model.get_encoder().layers
    names = {i: f"model.encoder.layers.{i}.self_attn" for i in range(len(layers))}
    moments = {i: layer_moments(stats, names[i], layer.self_attn.num_heads) for i, layer in enumerate(layers)}
    errors = probe_head_errors(model, moments, features, weights, granule, progress)
    dims = greedy_head_dims(errors, layers[0].self_attn.head_dim, budget)
    return {names[i]: d for i, d in sorted(dims.items())}


def narrowed_state(model: nn.Module, stats: EncoderStats, dims: Mapping[str, int],
                   ranks: Mapping[str, int]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The low-rank ranks after narrowing `dims` (attention fqn -> head dim; a folded pair leaves `ranks`) and
    the narrowed attentions' tensors, named as in the model."""
    kept = {n: r for n, r in ranks.items() if n.rsplit(".", 1)[0] not in dims}
    state: dict[str, torch.Tensor] = {}
    for name, dim in dims.items():
        attn = model.get_submodule(name)
        new = narrowed_attention(attn, dim, layer_moments(stats, name, attn.num_heads))
        for proj in PROJECTIONS:
            module = getattr(new, proj)
            if isinstance(module, LowRankLinear):
                kept[f"{name}.{proj}"] = module.rank
        state.update({f"{name}.{k}": v for k, v in new.state_dict().items()})
    order = list(ranks) + [n for n in kept if n not in ranks]
    return {n: kept[n] for n in order if n in kept}, state
