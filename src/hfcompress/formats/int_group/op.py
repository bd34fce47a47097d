"""``hfcompress::int_group_mm``: ``y = x @ dequantize(W)^T + bias`` for the int_group format.

The op's default implementation is the reference (:func:`int_group_mm_ref`). Faster backends
are registered per device type with :func:`register_backend` (``torch.library`` kernels, see
``hfcompress.formats.dispatch``): the Triton kernels for ``cuda`` and the native int4/int8 path
for ``cpu`` (``hfcompress.ops.backends``); nothing is probed at import time.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..dispatch import DeviceBackends
from .reference import dequantize, int_group_mm_ref, zero_point_of
from .spec import IntGroupSpec


#: the op itself: the reference is its default implementation (same signature, the schema is read
#: from the reference's annotations)
int_group_mm = torch.library.custom_op("hfcompress::int_group_mm", int_group_mm_ref, mutates_args=())


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
        spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=g_idx is not None,
                            zero_point=zero_point_of(qzero))
        w = dequantize(qweight, scale, qzero, g_idx, spec, in_features, dtype=grad.dtype)
        grad_x = torch.matmul(grad, w).to(dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None


int_group_mm.register_autograd(_backward, setup_context=_setup_context)

BACKENDS = DeviceBackends(int_group_mm, int_group_mm_ref)
_BACKENDS = BACKENDS.impls  # device type -> implementation (tests swap entries for a while)


def register_backend(device_type: str, impl: Callable | None) -> None:
    """Route ``int_group_mm`` on ``device_type`` tensors to ``impl`` (``None`` restores the reference).

    ``impl`` has the op's signature and may return ``None`` to fall back to the reference.
    """
    BACKENDS.register(device_type, impl)
