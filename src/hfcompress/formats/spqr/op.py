"""``hfcompress::spqr_mm``: ``y = x @ dequantize(W)^T + bias`` for the spqr format.

Default implementation: the reference (:func:`spqr_mm_ref`). Per-device backends
(``torch.library`` kernels through :class:`~hfcompress.formats.dispatch.DeviceBackends`):

- ``cpu``: the dense part on PyTorch's native int4 matmul plus the outliers as a sparse CSR
  product (:mod:`.cpu`); follows ``hfcompress.ops.set_cpu_fast_path`` like int_group.
- ``cuda``: the dense part on the int_group Triton kernel (its fp16 scales derived once from
  the stored statistics) followed by the sparse CSR product (:mod:`.cuda`).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..dispatch import DeviceBackends
from .reference import dequantize, spqr_mm_ref
from .spec import SpQRSpec


@torch.library.custom_op("hfcompress::spqr_mm", mutates_args=())
def spqr_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzero: torch.Tensor,
    scale_code: torch.Tensor,
    scale_scale: torch.Tensor,
    scale_zero: torch.Tensor,
    perm: torch.Tensor | None,
    outlier_ptr: torch.Tensor,
    outlier_col: torch.Tensor,
    outlier_val: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    stat_bits: int,
    stat_group_size: int,
    in_features: int,
) -> torch.Tensor:
    return spqr_mm_ref(x, qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col,
                       outlier_val, bias, bits, group_size, stat_bits, stat_group_size, in_features)


@spqr_mm.register_fake
def _(x, qweight, *args):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, *stored, bias, bits, group_size, stat_bits, stat_group_size, in_features = inputs
    ctx.save_for_backward(*stored)
    ctx.meta = (bits, group_size, stat_bits, stat_group_size, in_features, x.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    stored = ctx.saved_tensors
    bits, group_size, stat_bits, stat_group_size, in_features, dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        spec = SpQRSpec(bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group_size=stat_group_size,
                        act_order=stored[5] is not None)
        w = dequantize(*stored, spec, in_features, dtype=grad.dtype)
        grad_x = torch.matmul(grad, w).to(dtype)
    if ctx.needs_input_grad[10]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (grad_x,) + (None,) * 9 + (grad_bias,) + (None,) * 5


spqr_mm.register_autograd(_backward, setup_context=_setup_context)

BACKENDS = DeviceBackends(spqr_mm, spqr_mm_ref)


_CPU = None  # (cpu_fast_path_serves, spqr_mm_cpu), imported on the first CPU call (not at import time)


def _cpu_impl(*args):
    global _CPU
    if _CPU is None:
        from ...ops.backends import cpu_fast_path_serves
        from .cpu import spqr_mm_cpu

        _CPU = (cpu_fast_path_serves, spqr_mm_cpu)
    serves, impl = _CPU
    if not serves(args[0].dtype):  # fp32 models included (no 50x cliff), "off": the reference
        return None
    return impl(*args)


def _cuda_impl(*args):
    from .cuda import spqr_mm_cuda

    return spqr_mm_cuda(*args)


BACKENDS.register("cpu", _cpu_impl)
BACKENDS.register("cuda", _cuda_impl)


def is_plain_cpu_inference(x: torch.Tensor, *params) -> bool:
    """Whether a call can skip the dispatcher: plain CPU tensors, no gradient wanted, no
    compiler, no dispatch or torch-function mode (fake tensors, tracing, flop counters)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                                            for p in params)))
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled())


def spqr_mm_cpu_direct(*args) -> torch.Tensor:
    """What ``spqr_mm``'s CPU kernel computes, called without the dispatcher (about 30 us less
    per call at batch 1, where a decoding layer's whole int4 work is 20-50 us); only for
    :func:`is_plain_cpu_inference` calls."""
    impl = BACKENDS.impls.get("cpu")
    out = impl(*args) if impl is not None else None
    return out if out is not None else spqr_mm_ref(*args)
