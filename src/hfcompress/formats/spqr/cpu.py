"""Fast CPU path of ``spqr_mm``: the dense part on PyTorch's native int4 weight-only matmul, the
outliers as a sparse CSR product.

The int4 op takes one (scale, offset) pair per 32..256 input columns; SpQR groups are 16 wide.
Each run of 32 stored columns holds two groups ``a`` (first 16) and ``b`` (last 16), so the dense
product is two int4 matmuls over the *same* repacked codes: one with group ``a``'s scales on
``x`` with every ``b`` half zeroed, one with group ``b``'s scales on ``x`` with every ``a`` half
zeroed (exact: a zeroed input column contributes nothing whatever its scale). The op's weight
is ``(q - 8) * s + c`` per group, ours ``(q - z) * s``, so ``c = (8 - z) * s``. Like int_group's
CPU path this computes in bf16 (fp32 activations only with ``set_cpu_fast_path("always")``);
the outliers are multiplied in fp32. Re-packed once per layer into a cache keyed by the packed
tensor (``state_dict`` never sees it). Covers ``group_size`` 16 or any multiple of 32 with
``K % 32 == 0``; anything else returns ``None`` (the reference runs).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..int_group.pack import unpack_codes
from .reference import first_level_scales
from hfcompress.kernels.cache_key import tensor_versions as _versions

_CACHE: dict[int, tuple] = {}


def available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def _prepare(qweight, qzero, scale_code, scale_scale, scale_zero, perm, ptr, col, val, bits, group_size, stat_bits,
             stat_group_size, k):
    n = qweight.shape[0]
    gs = group_size
    if k % 32 or not (gs == 16 or gs % 32 == 0):
        return None
    codes = unpack_codes(qweight, bits, k).to(torch.int32)                                   # [N, K]
    s = first_level_scales(scale_code, scale_scale, scale_zero, stat_bits, stat_group_size, n).float()  # [N, G]
    z = unpack_codes(qzero, bits, n).t().to(torch.float32)                                   # [N, G]
    pad = -n % 16  # the packing op wants N % 16 == 0: zero-scale rows, sliced off after
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad)).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)

    def scale_zeros(s_sub, z_sub):  # [N, K/sub] -> [K/sub, N+pad, 2] bf16
        s_p = torch.nn.functional.pad(s_sub, (0, 0, 0, pad))
        c_p = torch.nn.functional.pad((8.0 - z_sub) * s_sub, (0, 0, 0, pad))
        return torch.stack([s_p.t(), c_p.t()], dim=-1).to(torch.bfloat16).contiguous()

    if gs == 16:
        halves = [scale_zeros(s[:, h::2], z[:, h::2]) for h in (0, 1)]       # group a / group b of each run of 32
        cols = torch.arange(k)
        masks = [((cols // 16) % 2 == h).to(torch.bfloat16) for h in (0, 1)]  # [K] which half a column is in
        sub = 32
    else:
        sub = next(x for x in (256, 128, 64, 32) if gs % x == 0 and k % x == 0)
        group_of_sub = torch.arange(0, k, sub) // gs
        halves, masks = [scale_zeros(s[:, group_of_sub], z[:, group_of_sub])], [None]
    sparse = None
    if val.numel():
        sparse = outlier_matrix(ptr, col, val, n, k)
    return packed, halves, masks, sub, None if perm is None else perm.long(), sparse, n


def outlier_matrix(ptr, col, val, n: int, k: int) -> torch.Tensor:
    """The outliers as an fp32 CSR matrix ``[N, K]`` (stored column order); the structure was
    validated when the layer loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(ptr.long(), col.long(), val.to(torch.float32), size=(n, k),
                                       check_invariants=False)


def _prepared(*args):
    qweight = args[0]
    key = id(qweight)
    versions = _versions(*args[:9])
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == versions:
        return hit[2]
    prep = _prepare(*args)
    _CACHE[key] = (weakref.ref(qweight, lambda _, key=key: _CACHE.pop(key, None)), versions, prep)
    return prep


def spqr_mm_cpu(x, qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                bias, bits, group_size, stat_bits, stat_group_size, in_features):
    """``spqr_mm`` on CPU tensors, or ``None`` when not covered (the reference runs)."""
    if not x.dtype.is_floating_point or x.dtype == torch.float64 or not available():
        return None
    prep = _prepared(qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                     bits, group_size, stat_bits, stat_group_size, in_features)
    if prep is None:
        return None
    packed, halves, masks, sub, perm_l, sparse, n = prep
    x2 = x.reshape(-1, in_features)
    if perm_l is not None:
        x2 = x2[:, perm_l]                                             # stored column order
    xb = x2.to(torch.bfloat16)
    y = None
    for sz, mask in zip(halves, masks):
        xm = (xb * mask if mask is not None else xb).contiguous()
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(xm, packed, sub, sz).to(torch.float32)
        y = part if y is None else y + part
    if y.shape[-1] != n:
        y = y[:, :n]
    if sparse is not None:
        y = y + torch.sparse.mm(sparse, x2.to(torch.float32).t()).t()  # [M, N] outliers in fp32
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
