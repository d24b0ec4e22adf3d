"""Dynamic int8 quantisation of a (compressed) Whisper's linear layers for CPU inference."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import SlimWhisperError
from ..mla.modules import WhisperMLAAttention

QUANTIZE_CHOICES = ("int8",)


def weight_read_linears(model: nn.Module) -> set[str]:
    """Names of linears whose `.weight` tensor is read directly (MLA's absorbed decode): they stay float."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, WhisperMLAAttention):
            names.update(f"{name}.{child}" for child in ("up_k", "up_v"))
    return names


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers run int8 weights with dynamically quantised activations.

    CPU only (torch's dynamic quantisation kernels); MLA up-projections stay float because the absorbed
    decode reads their weights as tensors.
    """
    if next(model.parameters()).device.type != "cpu":
        raise SlimWhisperError("int8 quantisation runs on the CPU only; drop --quantize or use --device cpu")
    keep = weight_read_linears(model)
    targets = {
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep and name
    }
    model = copy.deepcopy(model).float()
    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantisation is deprecated in favour of torchao; it still works in the pinned
        # torch, and its deprecation notices are not something our users can act on
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, qconfig_spec=targets, dtype=torch.qint8, inplace=False)


def is_quantized_linear(module: nn.Module) -> bool:
    """A dynamic int8 linear made by `quantize_dynamic_int8` (its packed int8 weight is behind `weight()`;
    its packed-parameter child module is not one)."""
    return type(module).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(module, "weight", None))


def float_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight [out, in] and bias of an `nn.Linear` or a dynamic int8 linear (dequantised)."""
    if is_quantized_linear(module):
        return module.weight().dequantize(), module.bias()
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def quantize_linear_int8(linear: nn.Linear) -> nn.Module:
    """One float linear as a dynamic int8 linear with a scale per output row (rows of fused projections differ)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        wrapped = quantize_dynamic(nn.Sequential(linear), qconfig_spec={nn.Linear: per_channel_dynamic_qconfig},
                                   dtype=torch.qint8, inplace=False)
    return wrapped[0]


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """Apply `method` (None or "int8")."""
    if method is None:
        return model
    if method == "int8":
        return quantize_dynamic_int8(model)
    raise SlimWhisperError(f"unknown quantisation {method!r}; choose one of {QUANTIZE_CHOICES}")
