"""``hfcompress::bitstack_mm``: ``y = x @ dequantize(W)^T + bias`` for the bitstack format.

Default implementation: the reference (:func:`~.reference.bitstack_mm_ref`, blocks one by one).
``cpu``: :func:`bitstack_mm_cpu` rebuilds the weight from all blocks at once (one batched
``u @ v``, one sign unpack for every plane) in the activation's dtype, then one matmul; same
values as the reference up to the order of the fp32 sums.
"""

from __future__ import annotations

import torch

from ..dispatch import DeviceBackends
from .reference import bitstack_mm_ref, dequantize, unpack_signs


@torch.library.custom_op("hfcompress::bitstack_mm", mutates_args=())
def bitstack_mm(x: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_scale: torch.Tensor,
                bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    return bitstack_mm_ref(x, signs, u, v, in_scale, bias, in_features)


@bitstack_mm.register_fake
def _(x, signs, u, *args):
    return x.new_empty(*x.shape[:-1], u.shape[1])


def _setup_context(ctx, inputs, output):
    x, signs, u, v, in_scale, bias, in_features = inputs
    ctx.save_for_backward(signs, u, v, in_scale)
    ctx.in_features, ctx.dtype = in_features, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    signs, u, v, in_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad.float() @ dequantize(signs, u, v, in_scale, ctx.in_features)).to(ctx.dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None


bitstack_mm.register_autograd(_backward, setup_context=_setup_context)


def bitstack_mm_cpu(x, signs, u, v, in_scale, bias, in_features):
    """All blocks at once: ``W = (sum_i where(S_i, -u_i v_i, u_i v_i)) / s``."""
    if signs.shape[0] == 0:
        return None  # no block: the reference's zeros
    uv = torch.bmm(u.float(), v.float())                                    # [B, N, K]
    neg = unpack_signs(signs, in_features)                                  # [B, N, K]
    w = torch.where(neg, -uv, uv).sum(0) / in_scale.float()[None, :]        # [N, K]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


BACKENDS = DeviceBackends(bitstack_mm, bitstack_mm_ref)
BACKENDS.register("cpu", bitstack_mm_cpu)
