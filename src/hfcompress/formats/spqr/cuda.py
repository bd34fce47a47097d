"""CUDA path of ``spqr_mm``: the dense part on the int_group Triton kernel (its fp16 scales
derived once from the stored second-level statistics, cached per layer), then the outliers as
a sparse CSR product. Returns ``None`` (the reference runs) without triton or for activation
dtypes the kernel does not take."""

from __future__ import annotations

import weakref

import torch

from .cpu import outlier_matrix
from .reference import first_level_scales

_CACHE: dict[int, tuple] = {}


def _scales(qweight, scale_code, scale_scale, scale_zero, stat_bits, stat_group_size):
    key = id(qweight)
    versions = tuple((id(t), t._version) for t in (qweight, scale_code, scale_scale, scale_zero))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == versions:
        return hit[2]
    s = first_level_scales(scale_code, scale_scale, scale_zero, stat_bits, stat_group_size, qweight.shape[0])
    _CACHE[key] = (weakref.ref(qweight, lambda _, key=key: _CACHE.pop(key, None)), versions, s)
    return s


def spqr_mm_cuda(x, qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                 bias, bits, group_size, stat_bits, stat_group_size, in_features):
    try:
        from hfcompress.kernels.int_group_mm import ACTIVATION_DTYPES, int_group_mm_triton
    except ImportError:  # no triton: the reference runs
        return None
    if x.dtype not in ACTIVATION_DTYPES:
        return None
    scale = _scales(qweight, scale_code, scale_scale, scale_zero, stat_bits, stat_group_size)  # [N, G] fp16
    x2 = x.reshape(-1, in_features)
    if perm is not None:
        x2 = x2[:, perm.long()].contiguous()                           # stored column order
    y = int_group_mm_triton(x2, qweight, scale, qzero, None, None, bits, group_size, False, in_features)
    if outlier_val.numel():
        n = qweight.shape[0]
        sparse = outlier_matrix(outlier_ptr, outlier_col, outlier_val, n, in_features)
        y = (y.to(torch.float32) + torch.sparse.mm(sparse, x2.to(torch.float32).t()).t()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
