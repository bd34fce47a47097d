"""BitStack format ("bitstack"), format_version 1: stacked residual blocks, each a sign bit-plane
times a rank-``r`` magnitude factorisation (BitStack, Wang et al., 2024).

A linear layer ``y = x W^T + b`` with ``W [N, K]`` holding ``B`` blocks (per layer) is::

    W = (sum_{i < B} S_i * (u_i v_i)) / s          S_i = +-1 (stored as bits), fp32 arithmetic

On-disk tensors of a module ``<prefix>`` (safetensors):

============================  =======  ==========================================================
name                          dtype    shape / content
============================  =======  ==========================================================
``<prefix>.weight``           int32    ``[B, N, ceil(K/32)]`` sign planes, bit ``j`` of word ``w``
                                       = element ``32 w + j`` negative (little-endian, zero padding)
``<prefix>.weight_u``         fp16     ``[B, N, r]``
``<prefix>.weight_v``         fp16     ``[B, r, K]``
``<prefix>.weight_in_scale``  fp32     ``[K]`` activation scale ``s`` (> 0)
``<prefix>.weight_gain``      fp32     ``[B]`` share of the layer's scaled energy each block removes
``<prefix>.bias``             float    ``[N]`` if bias
============================  =======  ==========================================================

``B`` is per layer (bound from the checkpoint's headers) and may differ between layers: a model
is a prefix of the stack (``stack.py``: order, budgets, loading only the blocks that fit,
``resize_``). Bits per weight of one block: ``1 + 16 r (N + K) / (N K)`` plus padding and its gain.

The folder: ``spec.py`` (BitStackSpec), ``reference.py`` (sign packing, dequantize, reference
matmul), ``op.py`` (``hfcompress::bitstack_mm`` and its CPU path), ``layer.py``
(BitStackLinear), ``stack.py``, ``config.py`` (BitStackConfig). The algorithm is
``hfcompress.algorithms.bitstack``.
"""

from __future__ import annotations

from ..registry import Format, register_format
from .config import BitStackConfig
from .layer import BitStackLinear
from .op import bitstack_mm
from .reference import bitstack_mm_ref, dequantize
from .spec import FORMAT_NAME, FORMAT_VERSION, BitStackSpec
from .stack import load_under_budget, resize_

FORMAT = register_format(Format(name=FORMAT_NAME, version=FORMAT_VERSION, spec_cls=BitStackSpec,
                                layer_cls=BitStackLinear, spec_fields=("rank",)))

__all__ = ["FORMAT", "BitStackConfig", "BitStackLinear", "BitStackSpec", "bitstack_mm", "bitstack_mm_ref",
           "dequantize", "load_under_budget", "resize_"]
