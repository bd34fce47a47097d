"""The spqr reference (the spec in code): the float weight a layer stores, and the matmul.

The dense part is an int_group grid (bits-bit codes, asymmetric, groups of ``group_size``
columns in stored order) whose fp16 scales are themselves stored as ``stat_bits`` codes:
``scale[n, g] = fp16((scale_code[g, n] - scale_zero[g, n // sg]) * scale_scale[g, n // sg])``
(fp32 arithmetic, rounded to fp16). The outliers (CSR, stored column order) are added on top,
in fp32; stored column ``j`` is input column ``perm[j]``.
"""

from __future__ import annotations

import torch

from ..int_group.pack import pack_codes, unpack_codes
from ..int_group.reference import dequantize as int_group_dequantize
from ..int_group.spec import IntGroupSpec
from .spec import SpQRSpec


def first_level_scales(scale_code: torch.Tensor, scale_scale: torch.Tensor, scale_zero: torch.Tensor,
                       stat_bits: int, stat_group_size: int, out_features: int) -> torch.Tensor:
    """fp16 scales ``[N, G]`` from the second-level stored statistics."""
    codes = unpack_codes(scale_code, stat_bits, out_features).to(torch.float32)   # [G, N]
    which = torch.arange(out_features, device=codes.device) // stat_group_size     # [N]
    s = scale_scale.to(torch.float32)[:, which]                                    # [G, N]
    z = scale_zero.to(torch.float32)[:, which]
    return ((codes - z) * s).to(torch.float16).t().contiguous()                    # [N, G]


def dense_spec(spec: SpQRSpec) -> IntGroupSpec:
    """The int_group grid of the dense part (asymmetric, natural groups in stored order)."""
    return IntGroupSpec(bits=spec.bits, group_size=spec.group_size, sym=False, act_order=False)


def outlier_rows(ptr: torch.Tensor) -> torch.Tensor:
    """CSR row pointer ``[N+1]`` -> the row of each outlier ``[nnz]``."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts)


def dequantize_stored(qweight, qzero, scale_code, scale_scale, scale_zero, outlier_ptr, outlier_col, outlier_val,
                      spec: SpQRSpec, in_features: int) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` in *stored* column order (dense + outliers)."""
    n = qweight.shape[0]
    scale = first_level_scales(scale_code, scale_scale, scale_zero, spec.stat_bits, spec.stat_group_size, n)
    w = int_group_dequantize(qweight, scale, qzero, None, dense_spec(spec), in_features)  # [N, K] fp32
    if outlier_val.numel():
        w[outlier_rows(outlier_ptr), outlier_col.long()] += outlier_val.to(torch.float32)
    return w


def dequantize(qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
               spec: SpQRSpec, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: the float weight ``[N, K]`` (input column order) a spqr layer stores."""
    w = dequantize_stored(qweight, qzero, scale_code, scale_scale, scale_zero, outlier_ptr, outlier_col, outlier_val,
                          spec, in_features)
    if perm is not None:
        out = torch.empty_like(w)
        out[:, perm.long()] = w
        w = out
    return w.to(dtype)


def spqr_mm_ref(x, qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                bias, bits: int, group_size: int, stat_bits: int, stat_group_size: int,
                in_features: int) -> torch.Tensor:
    """Reference matmul: dequantize to ``x.dtype`` exactly as the layer's ``dequantize``, then matmul."""
    spec = SpQRSpec(bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group_size=stat_group_size,
                    act_order=perm is not None)
    w = dequantize(qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                   spec, in_features, dtype=x.dtype)
    y = torch.matmul(x, w.t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def pack(result, spec: SpQRSpec, in_features: int) -> dict[str, torch.Tensor]:
    """Algorithm output (``hfcompress.algorithms.spqr.SpQRResult``) -> the stored tensors."""
    n = result.codes.shape[0]
    counts = torch.bincount(result.outlier_rows, minlength=n) if result.outlier_rows.numel() else \
        torch.zeros(n, dtype=torch.long, device=result.codes.device)
    ptr = torch.zeros(n + 1, dtype=torch.int32, device=result.codes.device)
    ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    out = {
        "weight": pack_codes(result.codes, spec.bits),
        "weight_zero": pack_codes(result.zero.t(), spec.bits),                   # [G, N] packed along N
        "weight_scale_code": pack_codes(result.scale_code.t(), spec.stat_bits),  # [G, N] packed along N
        "weight_scale_scale": result.stat_scale.to(torch.float16),
        "weight_scale_zero": result.stat_zero.to(torch.float16),
    }
    if spec.act_order:
        out["weight_perm"] = result.perm.to(spec.col_dtype(in_features))
    out["weight_outlier_ptr"] = ptr
    out["weight_outlier_col"] = result.outlier_cols.to(spec.col_dtype(in_features))
    out["weight_outlier_val"] = result.outlier_delta.to(torch.float16)
    return out
