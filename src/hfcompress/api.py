"""The verbs: ``quantize_`` (in memory) and ``dequantize_``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import HfCompressConfig
from .formats import CompressedLinear, get_format, is_compressed
from .modules import (check_module_table, linear_modules, linear_weight, resolve_modules_to_not_convert,
                      set_submodule)

#: called as ``hook(model, config)`` after a model is quantized in memory; the transformers
#: integration registers one that attaches its quantizer so save_pretrained works.
AFTER_QUANTIZE_HOOKS: list[Callable[[nn.Module, HfCompressConfig], None]] = []


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, config: HfCompressConfig,
                    spec=None) -> CompressedLinear:
    """A float ``[out, in]`` weight -> the format's compressed layer, with a data-free algorithm
    (``spec``: this module's spec, default ``config.spec``)."""
    spec = config.spec if spec is None else spec
    spec.check_layer(weight.shape[1])
    out = config.quantize_weight(weight, spec)
    return get_format(spec).layer_cls.from_codes(*out, spec, bias=bias, compute_dtype=weight.dtype)


def quantize_linear(module: nn.Module, config: HfCompressConfig, name: str = "") -> CompressedLinear:
    """One nn.Linear / Conv1D -> compressed layer with a data-free algorithm."""
    return quantize_weight(linear_weight(module), module.bias, config, spec=config.spec_for(name))


@torch.no_grad()
def quantize_(model: nn.Module, config: HfCompressConfig, progress: bool = False, **kwargs) -> nn.Module:
    """Quantize ``model`` in place with ``config``; returns it. Same result as
    ``from_pretrained(..., quantization_config=config)``."""
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an hfcompress config (e.g. hfcompress.RTNConfig), got {type(config).__name__}")
    if any(is_compressed(m) for m in model.modules()):
        raise ValueError("model is already quantized by hfcompress; quantize the float model instead")
    config.check_can_quantize()
    config.modules_to_not_convert = resolve_modules_to_not_convert(model, config.modules_to_not_convert)
    check_module_table(model, config)
    if config.data_free:
        targets = list(linear_modules(model, config.modules_to_not_convert))
        for name, module in tqdm(targets, desc=f"{config.algorithm} quantize", disable=not progress):
            try:
                set_submodule(model, name, quantize_linear(module, config, name))
            except ValueError as e:
                raise type(e)(f"{name}: {e}") from None
    else:
        config.calibrate_(model, progress=progress, **kwargs)
    for hook in AFTER_QUANTIZE_HOOKS:
        hook(model, config)
    return model


@torch.no_grad()
def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every compressed layer by the float layer it stands for (``nn.Linear``, or GPT-2's
    ``Conv1D`` where it replaced one) holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if is_compressed(module):
            w = module.dequantize()  # [out, in]
            device = w.device
            if module.source_conv1d:
                from transformers.pytorch_utils import Conv1D

                lin = Conv1D(module.out_features, module.in_features).to(device, module.compute_dtype)
                lin.weight.data.copy_(w.t())
                if module.bias is None:
                    lin.bias = None
            else:
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=device, dtype=module.compute_dtype)
                lin.weight.data.copy_(w)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias)
            lin.weight.requires_grad_(False)
            set_submodule(model, name, lin)
    return model


@torch.no_grad()
def requantize_(layer: CompressedLinear, weight: torch.Tensor, mse_clip: bool = True) -> CompressedLinear:
    """Store a new float ``weight [out, in]`` in ``layer`` on the layer's own grid layout (int_group:
    RTN with the same bits, groups, symmetry; act-order layers keep their g_idx)."""
    requantize = getattr(layer, "requantize_", None)
    if requantize is None:
        raise TypeError(f"requantize_: the {layer.format} format has no re-quantization of a float weight")
    return requantize(weight, mse_clip=mse_clip)
