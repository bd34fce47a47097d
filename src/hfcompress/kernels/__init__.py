"""Kernels for the hfcompress formats. This package imports only torch and triton, and only
when a kernel is first asked for (``import hfcompress.kernels`` touches no device and does not
import triton):

- ``int_group_mm_triton`` (int_group_mm.py): Triton GEMV / split-K GEMM / tiled GEMM / dense path
  (and torch's tinygemm, tinygemm.py, raced per shape) for the int_group format on CUDA (and on
  CPU under ``TRITON_INTERPRET=1``), on the runtime layout of gpu_layout.py (``gpu_layout.gpu_layout``:
  built once per layer from the stored tensors, cached outside ``state_dict``).
- ``int_group_mm_cpu`` (cpu.py): the CPU fast path through PyTorch's native int4 / int8
  weight-only matmuls, declining (``None``) what it does not cover.
"""

_LAZY = {
    "int_group_mm_triton": ("int_group_mm", "int_group_mm_triton"),
    "KernelConfig": ("configs", "KernelConfig"),
    "int_group_mm_cpu": ("cpu", "int_group_mm_cpu"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
