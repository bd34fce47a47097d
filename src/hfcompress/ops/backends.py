"""Default backends of ``hfcompress::int_group_mm`` (registered by ``import hfcompress.ops``;
nothing is probed or imported until the first call on a device):

- ``cuda``: the Triton kernels of ``hfcompress.kernels`` (triton is imported on the first CUDA
  call; without triton the reference runs).
- ``cpu``: PyTorch's native int4 / int8 weight-only matmuls (``hfcompress.kernels.cpu``), which
  compute in bf16. Mode ``"auto"`` (default) uses them for bf16/fp16 activations only, so fp32
  models keep the exact fp32 reference; ``"always"`` also runs fp32 activations through them
  (bf16 precision, much faster decode); ``"off"`` keeps the reference. Set with
  :func:`set_cpu_fast_path` or the environment variable ``HFCOMPRESS_CPU_FAST_PATH``.
"""

from __future__ import annotations

import os

import torch

from .int_group_mm import register_backend

CPU_MODES = ("auto", "always", "off")
_cpu_mode = "auto"


def _cuda_impl(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    try:
        from hfcompress.kernels.int_group_mm import ACTIVATION_DTYPES, int_group_mm_triton
    except ImportError:  # no triton: the reference runs
        return None
    if x.dtype not in ACTIVATION_DTYPES:
        return None
    return int_group_mm_triton(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)


def _cpu_impl(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    if _cpu_mode == "off" or (_cpu_mode == "auto" and x.dtype not in (torch.bfloat16, torch.float16)):
        return None
    from hfcompress.kernels.cpu import int_group_mm_cpu

    return int_group_mm_cpu(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features)


def set_cpu_fast_path(mode: str) -> str:
    """Choose the CPU path (``"auto"``, ``"always"``, ``"off"``); returns the previous mode."""
    global _cpu_mode
    if mode not in CPU_MODES:
        raise ValueError(f"set_cpu_fast_path: mode={mode!r}; choose one of {CPU_MODES}")
    previous, _cpu_mode = _cpu_mode, mode
    return previous


def register_defaults() -> None:
    """Register the CUDA and CPU backends (idempotent; touches no device)."""
    mode = os.environ.get("HFCOMPRESS_CPU_FAST_PATH", _cpu_mode)
    if mode not in CPU_MODES:
        raise ValueError(f"HFCOMPRESS_CPU_FAST_PATH={mode!r}; choose one of {CPU_MODES}")
    set_cpu_fast_path(mode)
    register_backend("cuda", _cuda_impl)
    register_backend("cpu", _cpu_impl)
