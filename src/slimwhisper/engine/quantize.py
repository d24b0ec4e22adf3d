"""Dynamic int8 quantisation of a (compressed) Whisper's linear layers for CPU inference."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention

QUANTIZE_CHOICES = ("int8",)


def float_linears(model: nn.Module) -> set[str]:
    """Names of linears that stay float under int8 quantisation.

    Read as tensors: MLA's up-projections (the absorbed decode) and the up-projections a low-rank
    encoder's rank-space attention folds in (q and k for the scores, v for the values, as planned for
    the encoder's one sequence length, `max_source_positions`, under the module's `attention_path`).
    Fed by PCA coordinates: the `up` half of every `LowRankLinear`. Its input holds the layer's outputs
    along their principal directions, whose scales span orders of magnitude (the first components carry
    Whisper's few huge activation channels), and a dynamic int8 activation has one scale per tensor, so
    the small components would round to nothing; the `down` half reads an ordinary activation and is
    quantised.
    """
    from ..lowrank.modules import LowRankLinear

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, WhisperMLAAttention):
            names.update(f"{name}.{child}" for child in ("up_k", "up_v"))
        elif isinstance(module, LowRankLinear):
            names.add(f"{name}.up")
    return names


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers run int8 weights with dynamically quantised activations.

    Each weight row (output channel) has its own scale, as CTranslate2's int8 has: one scale per matrix
    lets the row with the largest weight set the step for all, and the rows of small weights (in a
    low-rank `down` half, the later principal directions) keep only a few levels.
    CPU only (torch's dynamic quantisation kernels). Some linears stay float: see `float_linears`.
    """
    if next(model.parameters()).device.type != "cpu":
        raise SlimWhisperError("int8 quantisation runs on the CPU only; drop --quantize or use --device cpu")
    keep = float_linears(model)
    targets = {
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep and name
    }
    model = copy.deepcopy(model).float()
    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantisation is deprecated in favour of torchao; it still works in the pinned
        # torch, and its deprecation notices are not something our users can act on
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = dict.fromkeys(targets, per_channel_dynamic_qconfig)
        return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=False)


def is_quantized_linear(module: nn.Module) -> bool:
    """A dynamic int8 linear made by `quantize_dynamic_int8` (its packed int8 weight is behind `weight()`;
    its packed-parameter child module is not one)."""
    return type(module).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(module, "weight", None))


class Int8Call:
    """A dynamic int8 linear's forward as a direct call of its quantised op: the same result, without the
    module's per-call work (nn.Module dispatch and dtype checks), which is a real share of a small layer's
    time at batch 1, and a decoded token makes dozens of such calls."""

    def __init__(self, packed, reduce_range: bool):
        self.packed, self.reduce_range = packed, reduce_range
        self.op = torch.ops.quantized.linear_dynamic.default

    @classmethod
    def of(cls, module: nn.Module) -> Int8Call:
        return cls(module._packed_params._packed_params, _reduce_range(module))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.packed, self.reduce_range)


def direct_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to call for `module`'s forward in a hot loop: `Int8Call` for a dynamic int8 linear, else the module."""
    return Int8Call.of(module) if _is_qint8_linear(module) else module


def _is_qint8_linear(module: nn.Module) -> bool:
    return is_quantized_linear(module) and module._packed_params.dtype == torch.qint8


def _reduce_range(module: nn.Module) -> bool:
    """Whether the module's own forward reduces the activation range (from version 4 of its format on)."""
    return module.version is not None and module.version >= 4


def stack_int8_rows(modules: list[nn.Module]) -> Int8Call | None:
    """One int8 linear computing [m1(x) | m2(x) | ...] for dynamic int8 linears on the same input, or None.

    Every row keeps its source's int8 weights and scale, so the outputs are bitwise those of the separate
    calls, while the input is quantised once and read once (what `fuse_qkv` cannot promise: it
    requantises the stacked float weights). None if a module is not a qint8 dynamic linear with
    symmetric (zero-point 0) weights.
    """
    if not modules or not all(_is_qint8_linear(m) for m in modules) or len({m.version for m in modules}) != 1:
        return None
    weights = [m.weight() for m in modules]
    scales = []
    for w in weights:
        if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric) and w.q_zero_point() == 0:
            scales.append(torch.full((w.shape[0],), w.q_scale(), dtype=torch.double))
        elif w.qscheme() == torch.per_channel_affine and w.q_per_channel_axis() == 0 and not (
            w.q_per_channel_zero_points().any()
        ):
            scales.append(w.q_per_channel_scales().double())
        else:
            return None
    ints = torch.cat([w.int_repr() for w in weights])
    scale = torch.cat(scales)
    weight = torch._make_per_channel_quantized_tensor(ints, scale, torch.zeros(len(scale), dtype=torch.long), 0)
    bias = torch.cat([m.bias() if m.bias() is not None else ints.new_zeros(w.shape[0], dtype=torch.float)
                      for m, w in zip(modules, weights)])
    return Int8Call(torch.ops.quantized.linear_prepack(weight, bias), _reduce_range(modules[0]))


def float_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight [out, in] and bias of an `nn.Linear` or a dynamic int8 linear (dequantised)."""
    if is_quantized_linear(module):
        return module.weight().dequantize(), module.bias()
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def quantize_linear_int8(linear: nn.Linear) -> nn.Module:
    """One float linear as a dynamic int8 linear (a scale per output row, as every int8 linear here)."""
    return quantize_dynamic_int8(nn.Sequential(linear))[0]


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """Apply `method` (None or "int8")."""
    if method is None:
        return model
    if method == "int8":
        return quantize_dynamic_int8(model)
    raise SlimWhisperError(f"unknown quantisation {method!r}; choose one of {QUANTIZE_CHOICES}")
