"""SpQR format ("spqr"), format_version 1: a small-group integer grid with quantized statistics
plus fp16 sparse outliers (Dettmers et al., 2023).

A linear layer ``y = x W^T + b`` with ``W [N, K]`` is stored in *stored column order*: stored
column ``j`` is input column ``perm[j]`` (identity without act-order). In that order::

    s[n, g]  = fp16((c[g, n] - sz[g, n // sg]) * ss[g, n // sg])      (fp32 arithmetic)
    D[n, j]  = (q[n, j] - z[n, j // gs]) * s[n, j // gs]                (fp32)
    W'       = D + S        S: CSR outliers (fp16 deltas), added in fp32
    W[:, perm[j]] = W'[:, j]

with ``gs = group_size`` (first-level groups of input columns, 16 by default) and ``sg =
stat_group_size`` (second-level groups of output rows). The dense part ``D`` is exactly an
asymmetric ``int_group`` grid in stored order whose fp16 scales are kept as ``stat_bits``-bit
codes with an fp16 scale and zero per ``sg`` rows.

On-disk tensors of a module ``<prefix>`` (safetensors; ``G = K / gs``, ``S = ceil(N / sg)``):

===============================  =====================  ==============================================
name                             dtype                  shape / content
===============================  =====================  ==============================================
``<prefix>.weight``              int32                  ``[N, ceil(K/32)*bits]`` codes ``q``, int_group bit stream
``<prefix>.weight_zero``         int32                  ``[G, ceil(N/32)*bits]`` integer zeros ``z``, packed along N
``<prefix>.weight_scale_code``   int32                  ``[G, ceil(N/32)*stat_bits]`` scale codes ``c``, packed along N
``<prefix>.weight_scale_scale``  fp16                   ``[G, S]`` second-level scales ``ss``
``<prefix>.weight_scale_zero``   fp16                   ``[G, S]`` second-level zeros ``sz``
``<prefix>.weight_perm``         int16 (int32 if K>32768) ``[K]`` (act_order only)
``<prefix>.weight_outlier_ptr``  int32                  ``[N+1]`` CSR row pointer
``<prefix>.weight_outlier_col``  int16 (int32 if K>32768) ``[nnz]`` stored column of each outlier
``<prefix>.weight_outlier_val``  fp16                   ``[nnz]`` delta added to ``D``
``<prefix>.bias``                float                  ``[N]`` if bias
===============================  =====================  ==============================================

``nnz`` is per layer (bound from the checkpoint's headers before loading). Bits per weight,
everything counted: ``bits + bits/gs + stat_bits/gs + 32/(gs*sg) + 16/N (perm) + 32/K (row
pointer) + 32*nnz/(N*K)`` (3-bit, 16/16, 0.1% outliers, a 1536x576 layer: 3.59).

The folder: ``spec.py`` (SpQRSpec, ``tensors()``), ``reference.py`` (dequantize, reference
matmul, packing of the algorithm output), ``op.py`` (``hfcompress::spqr_mm`` and its per-device
backends), ``cpu.py`` / ``cuda.py`` (fast paths), ``layer.py`` (SpQRLinear), ``config.py``
(SpQRConfig). The algorithm is ``hfcompress.algorithms.spqr``.
"""

from __future__ import annotations

from ..registry import Format, register_format
from .config import SpQRConfig
from .layer import SpQRLinear
from .op import spqr_mm
from .reference import dequantize, spqr_mm_ref
from .spec import FORMAT_NAME, FORMAT_VERSION, SpQRSpec

FORMAT = register_format(Format(name=FORMAT_NAME, version=FORMAT_VERSION, spec_cls=SpQRSpec, layer_cls=SpQRLinear,
                                spec_fields=("bits", "group_size", "stat_bits", "stat_group_size", "act_order")))

__all__ = ["FORMAT", "SpQRConfig", "SpQRLinear", "SpQRSpec", "dequantize", "spqr_mm", "spqr_mm_ref"]
