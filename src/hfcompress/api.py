"""The verbs: ``quantize_`` (in memory) and ``dequantize_``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import HfCompressConfig
from .modules import linear_modules, linear_weight, resolve_modules_to_not_convert, set_submodule
from .nn import QuantLinear

#: called as ``hook(model, config)`` after a model is quantized in memory; the transformers
#: integration registers one that attaches its quantizer so save_pretrained works.
AFTER_QUANTIZE_HOOKS: list[Callable[[nn.Module, HfCompressConfig], None]] = []


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, config: HfCompressConfig) -> QuantLinear:
    """A float ``[out, in]`` weight -> QuantLinear, with a data-free algorithm."""
    config.spec.check_layer(weight.shape[1])
    codes, scale, zero, g_idx = config.quantize_weight(weight)
    return QuantLinear.from_codes(codes, scale, zero, g_idx, config.spec, bias=bias, compute_dtype=weight.dtype)


def quantize_linear(module: nn.Module, config: HfCompressConfig) -> QuantLinear:
    """One nn.Linear / Conv1D -> QuantLinear with a data-free algorithm."""
    return quantize_weight(linear_weight(module), module.bias, config)


@torch.no_grad()
def quantize_(model: nn.Module, config: HfCompressConfig, progress: bool = False, **kwargs) -> nn.Module:
    """Quantize ``model`` in place with ``config``; returns it. Same result as
    ``from_pretrained(..., quantization_config=config)``."""
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an hfcompress config (e.g. hfcompress.RTNConfig), got {type(config).__name__}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized by hfcompress; quantize the float model instead")
    config.check_can_quantize()
    config.modules_to_not_convert = resolve_modules_to_not_convert(model, config.modules_to_not_convert)
    if config.data_free:
        targets = list(linear_modules(model, config.modules_to_not_convert))
        for name, module in tqdm(targets, desc=f"{config.algorithm} quantize", disable=not progress):
            try:
                set_submodule(model, name, quantize_linear(module, config))
            except ValueError as e:
                raise type(e)(f"{name}: {e}") from None
    else:
        config.calibrate_(model, progress=progress, **kwargs)
    for hook in AFTER_QUANTIZE_HOOKS:
        hook(model, config)
    return model


@torch.no_grad()
def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by the float layer it stands for (``nn.Linear``, or GPT-2's
    ``Conv1D`` where it replaced one) holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            w = module.dequantize()  # [out, in]
            if module.source_conv1d:
                from transformers.pytorch_utils import Conv1D

                lin = Conv1D(module.out_features, module.in_features).to(module.weight.device, module.compute_dtype)
                lin.weight.data.copy_(w.t())
                if module.bias is None:
                    lin.bias = None
            else:
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=module.weight.device, dtype=module.compute_dtype)
                lin.weight.data.copy_(w)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias)
            lin.weight.requires_grad_(False)
            set_submodule(model, name, lin)
    return model


@torch.no_grad()
def requantize_(layer: QuantLinear, weight: torch.Tensor, mse_clip: bool = True) -> QuantLinear:
    """Store a new float ``weight [out, in]`` in ``layer`` with RTN on the layer's own grid
    layout (same bits, groups, symmetry; act-order layers keep their g_idx)."""
    from .algorithms.rtn import rtn
    from .formats.int_group import IntGroupSpec, default_g_idx
    from .nn.quant_linear import pack

    spec = layer.spec
    plain = IntGroupSpec(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, act_order=False)
    w = weight.to(torch.float32)
    if spec.act_order:
        g_idx = layer.weight_g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], default_g_idx(plain, layer.in_features, g_idx.device).long()):
            raise ValueError("requantize_: this layer's g_idx does not form equal contiguous groups once sorted")
        codes_p, scale, zero, _ = rtn(w[:, perm], plain, mse_clip=mse_clip)
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        tensors = pack(codes, scale, zero, layer.weight_g_idx, spec)
    else:
        codes, scale, zero, _ = rtn(w, plain, mse_clip=mse_clip)
        tensors = pack(codes, scale, zero, None, spec)
    layer.load_packed(**tensors)
    return layer
