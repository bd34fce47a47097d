"""Default backends of ``hfcompress::int_group_mm`` (registered by ``import hfcompress.ops``;
nothing is probed or imported until the first call on a device):

- ``cuda``: the Triton kernels of ``hfcompress.kernels`` (triton is imported on the first CUDA
  call; without triton the reference runs).
- ``cpu``: PyTorch's native int4 / int8 weight-only matmuls (``hfcompress.kernels.cpu``), which
  compute in bf16. Mode ``"auto"`` (default) uses them for fp32, bf16 and fp16 activations
  (fp32 in and out, bf16 inside: a quantized model loaded in fp32 is not 50x slower than the
  same model in bf16); a layer they cannot serve runs the reference and says so once, by name
  (:func:`label_layers`). ``"off"`` keeps the bit-exact reference (dequantize, then matmul in
  the activation dtype). ``"always"`` is an older name of ``"auto"``. Set with
  :func:`set_cpu_fast_path` or the environment variable ``HFCOMPRESS_CPU_FAST_PATH``.
"""

from __future__ import annotations

import os

import torch

from .int_group_mm import register_backend

CPU_MODES = ("auto", "off", "always")  # "always": older name of "auto"
_cpu_mode = "auto"


def _cuda_impl(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    try:
        from hfcompress.kernels.int_group_mm import ACTIVATION_DTYPES, int_group_mm_triton
    except ImportError:  # no triton: the reference runs
        return None
    if x.dtype not in ACTIVATION_DTYPES:
        return None
    return int_group_mm_triton(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)


def cpu_fast_path_serves(dtype: torch.dtype) -> bool:
    """Whether the CPU fast paths (of every format) take activations of ``dtype`` in the current mode."""
    # float64 asks for more precision than bf16 compute gives: the reference
    return _cpu_mode != "off" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def _cpu_impl(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    if not cpu_fast_path_serves(x.dtype):
        return None
    from hfcompress.kernels.cpu import int_group_mm_cpu

    return int_group_mm_cpu(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)


def set_cpu_fast_path(mode: str) -> str:
    """Choose the CPU path (``"auto"``, ``"always"``, ``"off"``); returns the previous mode."""
    global _cpu_mode
    if mode not in CPU_MODES:
        raise ValueError(f"set_cpu_fast_path: mode={mode!r}; choose one of {CPU_MODES}")
    previous, _cpu_mode = _cpu_mode, "auto" if mode == "always" else mode
    return previous


def cpu_fast_path_mode() -> str:
    """The current CPU mode (``"auto"`` or ``"off"``)."""
    return _cpu_mode


def label_layers(model) -> None:
    """Record the module name of every compressed layer of ``model`` so that the CPU fast path
    names a layer it cannot serve (one warning per layer)."""
    from hfcompress.kernels.cpu import label_

    for name, module in model.named_modules():
        qweight = getattr(module, "_buffers", {}).get("weight")
        if qweight is not None and not qweight.is_floating_point() and hasattr(module, "spec"):
            label_(qweight, name)


def register_defaults() -> None:
    """Register the CUDA and CPU backends (idempotent; touches no device)."""
    mode = os.environ.get("HFCOMPRESS_CPU_FAST_PATH", _cpu_mode)
    if mode not in CPU_MODES:
        raise ValueError(f"HFCOMPRESS_CPU_FAST_PATH={mode!r}; choose one of {CPU_MODES}")
    set_cpu_fast_path(mode)
    register_backend("cuda", _cuda_impl)
    register_backend("cpu", _cpu_impl)
