"""Triton helpers shared by the int_group kernels. They read the GPU layout of
``gpu_layout.py`` (never the stored v1 stream):

    codes   int32 [N, k_pad*b/32]  PER = 32/b codes per word (b = bits; the 3-bit low plane: 2)
    hi      int16 [N, k_pad/16]    3-bit only: the high bits, one half-word per word of ``codes``
    scale   fp16  [G', N]          one row per sub-group of SG input channels
    zero    fp16  [G', N]          zero points (asymmetric: integers, or float with zero_point="float")

K is cut into blocks of KI columns (the tile width); a block is WK = KI / PER words per row and
code ``j`` of word ``w`` is column ``j * WK + w`` of its block (interleaved). So a thread loads
its words once (contiguous along K: 128-bit vector loads) and code ``j`` of all of them,
``(words >> j*b) & mask``, lines up with one contiguous run of activations.
"""

import triton
import triton.language as tl


@triton.jit
def _load_words(qw_ptr, qh_ptr, offs_n, mask_n, k0, stride_qw, stride_qh, BITS: tl.constexpr, KI: tl.constexpr):
    """The tile's words ``[BN, WK]`` (and 3-bit high half-words, int32), streamed: evict-first."""
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LB
    WK: tl.constexpr = KI // PER
    offs_w = k0 // PER + tl.arange(0, WK)
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qw + offs_w[None, :], mask=mask_n[:, None], other=0,
                    eviction_policy="evict_first")
    if BITS == 3:
        hi = tl.load(qh_ptr + offs_n[:, None] * stride_qh + offs_w[None, :], mask=mask_n[:, None], other=0,
                     eviction_policy="evict_first").to(tl.int32)
    else:
        hi = words
    return words, hi


@triton.jit
def _code(words, hi, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of every word (int32, same shape as ``words``): shifts in registers."""
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    q = (words >> (j * LB)) & ((1 << LB) - 1)
    if BITS == 3:
        q = q | (((hi >> j) & 1) << 2)
    return q


@triton.jit
def _as_f32(q):
    """Exact fp32 of small non-negative int32 codes without an int->float conversion (those run
    at a fraction of the ALU rate): the bits of ``2**23 + q``, minus ``2**23``."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_kmajor(words, hi, BITS: tl.constexpr):
    """All codes of a tile in column order: ``[BN, WK]`` words -> int32 ``[BN, PER, WK]``
    (``[n, j, w]`` is column ``j * WK + w`` of the block)."""
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LB
    j = tl.arange(0, PER)[None, :, None]
    q = (words[:, None, :] >> (j * LB)) & ((1 << LB) - 1)
    if BITS == 3:
        q = q | (((hi[:, None, :] >> j) & 1) << 2)
    return q


@triton.jit
def _dequant_block(words, hi, s_ptr, z_ptr, offs_n, mask_n, k0, N,
                   BITS: tl.constexpr, SG: tl.constexpr, SYM: tl.constexpr, KI: tl.constexpr):
    """fp32 weights ``[BN, KI]`` of the block at ``k0``, columns in natural order."""
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LB
    WK: tl.constexpr = KI // PER
    q = _as_f32(_codes_kmajor(words, hi, BITS))  # [BN, PER, WK]
    cols = k0 + tl.arange(0, PER)[:, None] * WK + tl.arange(0, WK)[None, :]  # [PER, WK]
    if KI <= SG:  # one sub-group: one scale (and zero) per row
        ptr = (k0 // SG) * N + offs_n[:, None, None]
    elif SG >= WK:  # one sub-group per code position j
        ptr = ((k0 + tl.arange(0, PER) * WK) // SG)[None, :, None] * N + offs_n[:, None, None]
    else:
        ptr = (cols // SG)[None, :, :] * N + offs_n[:, None, None]
    m = mask_n[:, None, None]
    s = tl.load(s_ptr + ptr, mask=m, other=0).to(tl.float32)
    if SYM:
        c = s * (-(1 << (BITS - 1)))
    else:
        c = -tl.load(z_ptr + ptr, mask=m, other=0).to(tl.float32) * s
    return tl.reshape(q * s + c, (q.shape[0], KI))


@triton.jit
def _scale_zero(s_ptr, z_ptr, offs_n, mask_n, k0, N, j: tl.constexpr,
                BITS: tl.constexpr, SG: tl.constexpr, SYM: tl.constexpr, KI: tl.constexpr):
    """``(s, c)`` with ``c = -z * s`` (fp32, exact) for code ``j`` of the tile at ``k0``:
    ``[BN, 1]`` when its columns lie in one sub-group (``KI <= SG``: loaded once per tile, at
    ``j == 0``, and reused; or ``WK <= SG``: one per ``j``), ``[BN, WK]`` gathered otherwise."""
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LB
    WK: tl.constexpr = KI // PER
    if SG >= WK:
        g = (k0 + j * WK) // SG
        ptr = g * N + offs_n[:, None]
        m = mask_n[:, None]
    else:
        ptr = ((k0 + j * WK + tl.arange(0, WK)) // SG)[None, :] * N + offs_n[:, None]
        m = mask_n[:, None]
    s = tl.load(s_ptr + ptr, mask=m, other=0).to(tl.float32)
    if SYM:
        c = s * (-(1 << (BITS - 1)))
    else:
        c = -tl.load(z_ptr + ptr, mask=m, other=0).to(tl.float32) * s
    return s, c
