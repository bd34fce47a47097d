"""Integer group format ("int_group"), format_version 1.

A linear layer ``y = x W^T + b`` with ``W`` of shape ``[N, K]`` (out_features, in_features)
is stored as unsigned integer codes ``q[n, k]`` of ``bits`` bits and per-group float scales
(and, when asymmetric, integer zero points). Input channel ``k`` belongs to group
``g_idx[k]``; without act-order ``g_idx[k] = k // group_size`` (the last group is ragged
when ``K`` is not a multiple of ``group_size``); ``group_size = -1`` means one group per
output channel. The weight the layer computes with is exactly::

    W[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[n, g_idx[k]]        (in fp32, then cast)

with ``z = 2**(bits-1)`` (constant) when symmetric. With ``zero_point="float"`` (asymmetric only)
``z`` is any fp16 value, stored unpacked; codes are then ``clamp(round(w / s + z), 0, 2**bits - 1)``.

On-disk tensors of a module ``<prefix>`` (safetensors, row = output channel):

======================  =======  ===========================================  ============
name                    dtype    shape                                        when
======================  =======  ===========================================  ============
``<prefix>.weight``     int32    ``[N, ceil(K / 32) * bits]``                  always
``<prefix>.weight_scale``  fp16  ``[N, G]``                                    always
``<prefix>.weight_zero``   int32 ``[G, ceil(N / 32) * bits]``                  asymmetric
``<prefix>.weight_zero``   fp16  ``[G, N]``                                    zero_point="float"
``<prefix>.weight_g_idx``  int32 ``[K]``, values in ``[0, G)``                 act_order
``<prefix>.bias``       float    ``[N]``                                       if bias
======================  =======  ===========================================  ============

``G = ceil(K / group_size)`` (``1`` for per-channel). Codes are packed as a little-endian
bit stream along the last axis: every run of 32 codes becomes ``bits`` int32 words, code
``j`` of the run occupying bits ``[j*bits, (j+1)*bits)`` of the run; for 2/4/8 bits this is
the usual "32/bits codes per word, lowest code in the lowest bits". The axis is padded with
zero codes to a multiple of 32. Zero points are packed the same way along out_features
(``weight_zero[g]`` holds the zeros of group ``g`` for every output channel), so few groups
cost no padding. The packed tensor is called ``weight`` on purpose: a
process that never imported hfcompress sees an int32 tensor whose shape cannot fit the float
``nn.Linear.weight`` and transformers refuses to load it, instead of silently loading
garbage.

The folder: ``spec.py`` (IntGroupSpec: fields, validation naming the field, ``tensors()``, the
single source of the table above), ``pack.py`` (bit streams), ``reference.py`` (dequantize and
the reference matmul: the spec in code), ``op.py`` (``hfcompress::int_group_mm`` with its
per-device backends), ``layer.py`` (QuantLinear).
"""

from __future__ import annotations

from ..registry import Format, FormatError, register_format, validate_tensors
from .layer import QuantLinear
from .op import int_group_mm, int_group_mm_ref, register_backend
from .pack import pack, pack_codes, packed_len, unpack_codes
from .reference import default_g_idx, dequantize
from .spec import FORMAT_NAME, FORMAT_VERSION, SCALE_DTYPE, SUPPORTED_BITS, ZERO_DTYPE, ZERO_POINTS, IntGroupSpec

FORMAT = register_format(Format(name=FORMAT_NAME, version=FORMAT_VERSION, spec_cls=IntGroupSpec,
                                layer_cls=QuantLinear, spec_fields=("bits", "group_size", "sym", "act_order", "zero_point")))

__all__ = [
    "FORMAT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCALE_DTYPE",
    "SUPPORTED_BITS",
    "ZERO_DTYPE",
    "ZERO_POINTS",
    "FormatError",
    "IntGroupSpec",
    "QuantLinear",
    "default_g_idx",
    "dequantize",
    "int_group_mm",
    "int_group_mm_ref",
    "pack",
    "pack_codes",
    "packed_len",
    "register_backend",
    "unpack_codes",
    "validate_tensors",
]

from ... import ops as _ops  # noqa: E402,F401  (registers the default CUDA/CPU backends of int_group_mm)
