"""Fast CPU path of ``spqr_mm``: the dense part on PyTorch's native int4 weight-only matmul, the
outliers added with one ``index_add_`` (``y[:, row] += delta * x[:, col]``; a sparse CSR product
cost ~10x more per call at batch 1).

The int4 op takes one (scale, offset) pair per 32..256 input columns; SpQR groups are 16 wide.
Each run of 32 stored columns holds two groups ``a`` (first 16) and ``b`` (last 16), so the dense
product is two int4 matmuls over the *same* repacked codes: one with group ``a``'s scales on
``x`` with every ``b`` half zeroed, one with group ``b``'s scales on ``x`` with every ``a`` half
zeroed (exact: a zeroed input column contributes nothing whatever its scale). The op's weight
is ``(q - 8) * s + c`` per group, ours ``(q - z) * s``, so ``c = (8 - z) * s``. Like int_group's
CPU path this multiplies in bf16 (fp32 activations only with ``set_cpu_fast_path("always")``);
the two halves and the outliers are summed in fp32, or in bf16 for bf16 activations (as a bf16
model's reference computes). A single input row (decoding) takes the same steps on 1-D views
(``index_select`` / ``index_add`` on vectors cost about half their 2-D forms at this size).
Re-packed once per layer into a cache keyed by the packed
tensor (``state_dict`` never sees it). Covers ``group_size`` 16 or any multiple of 32 with
``K % 32 == 0``; anything else returns ``None`` (the reference runs).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from ..int_group.pack import unpack_codes
from .reference import first_level_scales, outlier_rows
from hfcompress.kernels.cache_key import tensor_versions as _versions

_CACHE: dict[int, tuple] = {}


def _int4_mm():
    """PyTorch's native int4 weight-only matmul, or ``None`` in a build without it (looked up once)."""
    global _MM
    if _MM is False:
        ops = torch.ops.aten
        have = hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
        _MM = ops._weight_int4pack_mm_for_cpu if have else None
    return _MM


_MM = False


def available() -> bool:
    return _int4_mm() is not None


@dataclass(frozen=True)
class _Prepared:
    packed: torch.Tensor                 # int4pack of the codes [N+pad, K] (stored column order)
    scale_zeros: tuple                   # per int4 call: [K/sub, N+pad, 2] bf16 (s, (8 - z) * s)
    masks: torch.Tensor | None           # [calls, 1, K] bf16: the input columns each call sees (16-wide groups)
    masks_1d: torch.Tensor | None        # the same [calls, K]
    sub: int                             # the int4 op's group size
    perm: torch.Tensor | None            # [K] long: stored column j reads input column perm[j]
    rows: torch.Tensor                   # [nnz] long: output row of each outlier
    cols: torch.Tensor                   # [nnz] long: stored column of each outlier
    vals: torch.Tensor                   # [nnz] fp32 deltas
    vals_bf16: torch.Tensor              # [nnz] the same in bf16 (bf16 activations)
    n: int


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
        halves = tuple(scale_zeros(s[:, h::2], z[:, h::2]) for h in (0, 1))   # group a / group b of each run of 32
        cols = torch.arange(k)
        masks = torch.stack([((cols // 16) % 2 == h) for h in (0, 1)])[:, None, :].to(torch.bfloat16)  # [2, 1, K]
        sub = 32
    else:
        sub = next(x for x in (256, 128, 64, 32) if gs % x == 0 and k % x == 0)
        group_of_sub = torch.arange(0, k, sub) // gs
        halves, masks = (scale_zeros(s[:, group_of_sub], z[:, group_of_sub]),), None
    return _Prepared(packed, halves, masks, None if masks is None else masks[:, 0].contiguous(), sub, None if perm is None else perm.long(),
                     outlier_rows(ptr), col.long(), val.to(torch.float32), val.to(torch.bfloat16), n)


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
    mm = _int4_mm()
    if not x.dtype.is_floating_point or x.dtype == torch.float64 or mm is None:
        return None
    prep = _prepared(qweight, qzero, scale_code, scale_scale, scale_zero, perm, outlier_ptr, outlier_col, outlier_val,
                     bits, group_size, stat_bits, stat_group_size, in_features)
    if prep is None:
        return None
    bf16 = x.dtype == torch.bfloat16  # a bf16 model sums in bf16 (as its reference does), others in fp32
    n = prep.n
    if x.numel() == in_features:  # one row (decoding): 1-D gathers, cheaper than their 2-D forms
        return _one_row(x, prep, bias, mm, bf16)
    x2 = x.reshape(-1, in_features)
    if prep.perm is not None:
        x2 = x2.index_select(1, prep.perm)                             # stored column order
    xb = x2.to(torch.bfloat16)
    if prep.masks is None:
        y = mm(xb.contiguous(), prep.packed, prep.sub, prep.scale_zeros[0])
        y = y if bf16 else y.to(torch.float32)
    else:                                                              # 16-wide groups: two calls, halves masked
        xab = xb * prep.masks                                          # [2, M, K]
        y = mm(xab[0], prep.packed, prep.sub, prep.scale_zeros[0])
        y = y if bf16 else y.to(torch.float32)
        y += mm(xab[1], prep.packed, prep.sub, prep.scale_zeros[1])
    if y.shape[-1] != n:
        y = y[:, :n]
    if prep.vals.numel():                                              # outliers: y[:, r] += v * x[:, c]
        y.index_add_(1, prep.rows, x2.index_select(1, prep.cols) * (prep.vals_bf16 if bf16 else prep.vals))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _one_row(x, prep: _Prepared, bias, mm, bf16: bool):
    """:func:`spqr_mm_cpu` for a single input row: the same operations on 1-D views."""
    x1 = x.reshape(-1)                                                 # [K]
    if prep.perm is not None:
        x1 = x1.index_select(0, prep.perm)                             # stored column order
    xb = x1 if bf16 else x1.to(torch.bfloat16)
    if prep.masks is None:
        y = mm(xb.view(1, -1), prep.packed, prep.sub, prep.scale_zeros[0])
        y = y if bf16 else y.to(torch.float32)
    else:
        xab = xb * prep.masks_1d                                       # [2, K]
        y = mm(xab[:1], prep.packed, prep.sub, prep.scale_zeros[0])
        y = y if bf16 else y.to(torch.float32)
        y += mm(xab[1:], prep.packed, prep.sub, prep.scale_zeros[1])
    y1 = y.view(-1)
    if y1.shape[0] != prep.n:
        y1 = y1[:prep.n]
    if prep.vals.numel():
        y1 = y1.index_add(0, prep.rows, x1.index_select(0, prep.cols) * (prep.vals_bf16 if bf16 else prep.vals))
    if not bf16:
        y1 = y1.to(x.dtype)
    if bias is not None:
        y1 = y1 + bias.to(x.dtype)
    return y1.view(*x.shape[:-1], prep.n)
