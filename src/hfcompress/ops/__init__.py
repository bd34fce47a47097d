"""Operators behind the compressed layers (``torch.library`` custom ops).

Each op has a pure-torch reference (the spec, used on CPU and in tests), a fake for
torch.compile, and backend registrations added lazily: the Triton kernels of
``hfcompress.kernels`` for CUDA tensors.
"""

from .int_group_mm import int_group_mm, int_group_mm_ref
from .backends import label_layers, register_defaults as _register_defaults, set_cpu_fast_path

_register_defaults()  # Triton for cuda, native int4/int8 for cpu; imported on first call

__all__ = ["int_group_mm", "int_group_mm_ref", "label_layers", "set_cpu_fast_path"]
