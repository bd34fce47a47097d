"""Fast CPU path for the int_group format through PyTorch's native weight-only matmuls.

- 2/3/4-bit: ``aten._weight_int4pack_mm_for_cpu``. Its weight is ``(q - 8) * s + c`` per group
  of 32/64/128/256 input channels; ours is ``(q - z) * s``, so ``c = (8 - z) * s`` (exact in
  fp32: ``s`` is fp16 and ``8 - z`` a small integer; a float zero point, ``zero_point="float"``,
  rounds it at fp32 precision, far below the bf16 the op computes in). 2- and 3-bit codes are 4-bit codes that
  never exceed 3 / 7, so they take the same op (the repacked copy holds 4 bits per weight).
  A group size that is a multiple of 32 (or per-channel) maps onto sub-groups of 32..256 with
  repeated scales; act-order layers whose ``g_idx`` sorts into equal contiguous groups permute
  the activations instead of the weight.
- 4-bit, from ``DENSE_MIN_ROWS`` rows on (prefill, perplexity windows): the
  layer's bf16 weight is unpacked from the stored words on the fly and a dense bf16 matmul runs
  (the native int4 op is compute-bound there; nothing is cached, memory stays at 4 bits).
- 8-bit, one group per output channel, K % 16 == 0: ``aten._weight_int8pack_mm`` on ``q - 128`` (int8)
  with per-channel scales, plus the rank-1 zero-point term ``sum_k x[m, k] * (128 - z[n]) * s[n]``.

Both ops are fast on CPU only in bf16 (fp32 is a scalar fallback, 100x slower), so this path
computes with bf16 activations and bf16 scales and returns the input dtype: outputs differ
from the fp32 reference at bf16 precision (measured SQNR in tests/test_kernels_cpu.py).
Everything else (ragged groups, grouped 8-bit, K not a multiple of 32) returns ``None``: the
caller runs the reference, and the first call on such a layer warns once, naming the layer
(:func:`label_`) and why. The rearranged weights live in a cache keyed by the packed tensor
(dropped with it, rebuilt if it is modified in place); ``state_dict`` never sees them.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .bitstream import unpack_stream
from .cache_key import tensor_versions as _versions

_SUBGROUPS = (256, 128, 64, 32)
_CACHE: dict[int, tuple] = {}  # id(qweight) -> (weakref(qweight), versions, prepared or reason it declined)
_NAMES: dict[int, tuple] = {}  # id(qweight) -> (weakref(qweight), module name)
_WARNED_UNAVAILABLE = False
_AVAILABLE: bool | None = None
_INT4_MM = _INT8_MM = None  # the aten ops, looked up on first use


def label_(qweight: torch.Tensor, name: str) -> None:
    """Remember the module name of a packed weight (for the one warning when it is declined)."""
    key = id(qweight)
    _NAMES[key] = (weakref.ref(qweight, lambda _, key=key: _NAMES.pop(key, None)), name)


def _name_of(qweight) -> str:
    hit = _NAMES.get(id(qweight))
    if hit is not None and hit[0]() is qweight:
        return hit[1]
    return f"a layer with packed weight {tuple(qweight.shape)}"


def available() -> bool:
    global _AVAILABLE
    if _AVAILABLE is None:  # asked once: looking ops up on torch.ops costs microseconds every call
        ops = torch.ops.aten
        _AVAILABLE = hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    return _AVAILABLE


def _unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 bit streams ``[R, ceil(L/32)*bits]`` -> int32 codes ``[R, L]``."""
    return unpack_stream(packed, bits, length).to(torch.int32)


def _prepare_int4(qweight, scale, qzero, g_idx, group_size, sym, k, bits=4):
    n = qweight.shape[0]
    gs = k if group_size == -1 or scale.shape[1] == 1 else group_size
    codes = _unpack(qweight, bits, k)  # [N, K], values < 2**bits <= 16
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], torch.arange(k) // gs):
            return "its act-order groups (g_idx) do not sort into equal contiguous groups"
        codes = codes[:, perm]
    sub = next((s for s in _SUBGROUPS if gs % s == 0 and k % s == 0), None)
    if sub is None:
        return (f"in_features={k} with group_size={group_size} does not split into sub-groups of 32..256 "
                "channels (the native int4 matmul needs K and the group size to be multiples of 32)")
    group_of_sub = torch.arange(0, k, sub) // gs  # [K/sub]
    s = scale.to(torch.float32)[:, group_of_sub]  # [N, K/sub]
    if sym:
        z_g = torch.full_like(scale, float(1 << (bits - 1)), dtype=torch.float32)
    else:  # integer zeros packed like the codes, or fp16 float zeros (zero_point="float")
        z_g = (qzero if qzero.is_floating_point() else _unpack(qzero, bits, n)).t().to(torch.float32)  # [N, G]
    z = z_g[:, group_of_sub]  # [N, K/sub]
    dense = None
    if bits == 4 and k % gs == 0:  # what the prefill path needs (see _dense_bf16)
        s_g = scale.to(torch.float32)  # [N, G]
        if g_idx is None:
            dense = (s_g.unsqueeze(-1).contiguous(), z_g.unsqueeze(-1).contiguous(), gs, None)  # [N, G, 1] each
        else:  # act-order: columns sorted by group (perm), so the weight comes out in x[:, perm] order
            dense = (s_g.unsqueeze(-1).contiguous(), z_g.unsqueeze(-1).contiguous(), gs, perm)
    pad = -n % 16  # the packing op wants N % 16 == 0: pad with zero-scale rows, sliced off after
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    s, c = torch.nn.functional.pad(s, (0, 0, 0, pad)), torch.nn.functional.pad((8.0 - z) * s, (0, 0, 0, pad))
    scale_zero = torch.stack([s.t(), c.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/sub, N+pad, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    return ("int4", packed, scale_zero, sub, perm, n, dense)


_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # the 8 codes of an int32 word, lowest bits first
DENSE_MIN_ROWS = 256  # from this many rows (prefill, perplexity windows) the dense bf16 matmul is faster


def _dense_bf16(qweight: torch.Tensor, dense: tuple, k: int) -> torch.Tensor:
    """The bf16 weight ``[N, K]`` of a 4-bit layer, unpacked straight from the
    stored words: ``(q - z) * s`` per group, in fp32 as the reference computes it, rounded once to bf16 (about 1 ms for 0.9 M
    weights, where the generic reference unpacking takes about 9). With many rows the native int4
    matmul is slower than this unpacking plus a dense bf16 matmul (2x at 512 rows)."""
    s, z, gs, perm = dense  # [N, G, 1] scales and zero points; act-order: the column order by group
    n = qweight.shape[0]
    codes = ((qweight.unsqueeze(-1) >> _SHIFTS) & 0xF).view(n, k).to(torch.float32)  # code i: bits 4i..4i+3
    if perm is not None:  # act-order: columns in group order (the caller permutes x the same way)
        codes = codes.index_select(1, perm)
    codes = codes.view(n, k // gs, gs)  # [N, G, gs]
    return ((codes - z) * s).view(n, k).to(torch.bfloat16)  # the reference's fp32 numbers, rounded once


def _prepare_int8(qweight, scale, qzero, sym, k):
    n = qweight.shape[0]
    w8 = (_unpack(qweight, 8, k) - 128).to(torch.int8).contiguous()  # [N, K]
    s = scale[:, 0].to(torch.float32)
    zero_term = None
    if not sym:
        # integer zeros packed like the codes ([1, N/4] int32), or fp16 float zeros ([1, N], zero_point="float")
        z = (qzero if qzero.is_floating_point() else _unpack(qzero, 8, n))[0].to(torch.float32)  # [N]
        zero_term = (128.0 - z) * s  # fp32
    return ("int8", w8, s.to(torch.bfloat16), zero_term)


def _prepared(qweight, scale, qzero, g_idx, bits, group_size, sym, k):
    key = id(qweight)
    versions = _versions(qweight, scale, qzero, g_idx)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == versions:
        return hit[2]
    if bits in (2, 3, 4):
        prep = _prepare_int4(qweight, scale, qzero, g_idx, group_size, sym, k, bits)
    elif bits == 8 and scale.shape[1] != 1:
        prep = f"8-bit with group_size={group_size}: the native int8 matmul has one scale per output channel"
    elif bits == 8 and k % 16:  # the int8 op reads out of bounds otherwise
        prep = f"8-bit with in_features={k}: the native int8 matmul needs a multiple of 16"
    elif bits == 8:
        prep = _prepare_int8(qweight, scale, qzero, sym, k)
    else:
        prep = f"{bits}-bit codes have no native CPU matmul"
    if isinstance(prep, str):
        warnings.warn(f"hfcompress CPU fast path cannot serve {_name_of(qweight)}: {prep}; it runs the reference "
                      "(dequantize, then matmul, every call: much slower)", stacklevel=4)
    _CACHE[key] = (weakref.ref(qweight, lambda _, key=key: _CACHE.pop(key, None)), versions, prep)
    return prep


def int_group_mm_cpu(x, qweight, scale, qzero, g_idx, bias, bits, group_size, sym, in_features):
    """``int_group_mm`` on CPU tensors via native int4/int8 matmuls, or ``None`` when not covered."""
    global _WARNED_UNAVAILABLE, _INT4_MM, _INT8_MM
    if not x.dtype.is_floating_point or x.dtype == torch.float64:
        return None
    if not available():
        if not _WARNED_UNAVAILABLE:
            _WARNED_UNAVAILABLE = True
            warnings.warn(f"hfcompress CPU fast path: torch {torch.__version__} has no native int4 matmul "
                          "(aten._weight_int4pack_mm_for_cpu); every quantized layer runs the reference", stacklevel=3)
        return None
    prep = _prepared(qweight, scale, qzero, g_idx, bits, group_size, sym, in_features)
    if isinstance(prep, str):
        return None
    if _INT4_MM is None:
        _INT4_MM, _INT8_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default, torch.ops.aten._weight_int8pack_mm.default
    x2 = x.reshape(-1, in_features)
    if prep[0] == "int4":
        _, packed, scale_zero, sub, perm, n, dense = prep
        if perm is not None:
            x2 = x2[:, perm]
        if dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            y = torch.matmul(x2.to(torch.bfloat16), _dense_bf16(qweight, dense, in_features).t())
        else:
            y = _INT4_MM(x2.to(torch.bfloat16).contiguous(), packed, sub, scale_zero)
            if y.shape[-1] != n:
                y = y[:, :n]
    else:
        _, w8, s, zero_term = prep
        xb = x2.to(torch.bfloat16).contiguous()
        y = _INT8_MM(xb, w8, s)
        if zero_term is not None:
            y = y.float() + xb.sum(-1, keepdim=True, dtype=torch.float32) * zero_term
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
