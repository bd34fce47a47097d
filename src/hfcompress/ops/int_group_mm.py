"""``hfcompress::int_group_mm``: ``y = x @ dequantize(W)^T + bias`` for the int_group format.

Dispatch: the op's default implementation is the reference below. Faster backends replace it
per device with :func:`register_backend` (the Triton kernels for ``cuda``, a native int4/int8
path for ``cpu``); nothing is probed at import time.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..formats.int_group import IntGroupSpec, dequantize

_BACKENDS: dict[str, Callable] = {}


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
    spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=g_idx is not None)
    w = dequantize(qweight, scale, qzero, g_idx, spec, in_features, dtype=x.dtype)
    y = torch.matmul(x, w.t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


@torch.library.custom_op("hfcompress::int_group_mm", mutates_args=())
def int_group_mm(
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
    impl = _BACKENDS.get(x.device.type)
    if impl is not None:
        out = impl(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)
        if out is not None:  # a backend may decline a case it does not cover
            return out
    return int_group_mm_ref(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)


@int_group_mm.register_fake
def _(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features = inputs
    ctx.save_for_backward(qweight, scale, qzero, g_idx)
    ctx.meta = (bits, group_size, sym, in_features, x.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    qweight, scale, qzero, g_idx = ctx.saved_tensors
    bits, group_size, sym, in_features, dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=g_idx is not None)
        w = dequantize(qweight, scale, qzero, g_idx, spec, in_features, dtype=grad.dtype)
        grad_x = torch.matmul(grad, w).to(dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None


int_group_mm.register_autograd(_backward, setup_context=_setup_context)


def register_backend(device_type: str, impl: Callable | None) -> None:
    """Route ``int_group_mm`` on ``device_type`` tensors to ``impl`` (``None`` restores the reference).

    ``impl`` has the op's signature and may return ``None`` to fall back to the reference.
    """
    if impl is None:
        _BACKENDS.pop(device_type, None)
    else:
        _BACKENDS[device_type] = impl
