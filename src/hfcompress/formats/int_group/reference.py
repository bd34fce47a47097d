"""The int_group reference (the spec in code): the float weight a layer stores, and the matmul."""

from __future__ import annotations

import torch

from .pack import unpack_codes
from .spec import IntGroupSpec


def default_g_idx(spec: IntGroupSpec, in_features: int, device=None) -> torch.Tensor:
    g = spec.effective_group_size(in_features)
    return (torch.arange(in_features, device=device, dtype=torch.int32) // g).to(torch.int32)


def zero_point_of(qzero: torch.Tensor | None) -> str:
    """How a layer's stored zero points are held (the op's arguments carry no spec): fp16 zeros are
    ``zero_point="float"``, packed int32 ones (or none) ``"int"``."""
    return "float" if qzero is not None and qzero.is_floating_point() else "int"


def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    qzero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: IntGroupSpec,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference: the float weight ``[N, K]`` this format stores (the spec above)."""
    n_out = scale.shape[0]
    codes = unpack_codes(qweight, spec.bits, in_features).to(torch.float32)
    if g_idx is None:
        g_idx = default_g_idx(spec, in_features, qweight.device)
    g_idx = g_idx.long()
    s = scale.to(torch.float32)[:, g_idx]
    if spec.sym:
        z = float(1 << (spec.bits - 1))
    elif spec.zero_point == "float":
        z = qzero.to(torch.float32).t()[:, g_idx]
    else:
        z = unpack_codes(qzero, spec.bits, n_out).to(torch.float32).t()[:, g_idx]
    return ((codes - z) * s).to(dtype)


def int_group_mm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    qzero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    in_features: int,
) -> torch.Tensor:
    """Reference: dequantize to ``x.dtype`` exactly as :meth:`QuantLinear.dequantize`, then matmul."""
    spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=g_idx is not None,
                        zero_point=zero_point_of(qzero))
    w = dequantize(qweight, scale, qzero, g_idx, spec, in_features, dtype=x.dtype)
    y = torch.matmul(x, w.t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
