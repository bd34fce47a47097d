"""Triton helpers shared by the int_group kernels: read codes out of the packed bit stream
and dequantize a tile, exactly as the format defines it (hfcompress.formats.int_group):

    W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]     g(k) = g_idx[k] or k // group_size

Codes are a stream along K per output row (``weight [N, ceil(K/32)*BITS]``); zero points a
stream along N per group (``weight_zero [G, ceil(N/32)*BITS]``).
The stream: every run of 32 codes is ``BITS`` int32 words, code ``j`` of a run at bits
``[j*BITS, (j+1)*BITS)``; only 3-bit codes straddle two words (j = 10 and j = 21).
"""

import triton
import triton.language as tl


@triton.jit
def _unpack_codes(row_ptr, idx, mask, BITS: tl.constexpr):
    """Codes ``idx`` (any int tensor broadcastable with ``row_ptr``) of the streams at ``row_ptr``."""
    bitpos = (idx % 32) * BITS
    word = (idx // 32) * BITS + bitpos // 32
    off = bitpos % 32
    w = tl.load(row_ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = w >> off.to(tl.uint32)
    if BITS == 3:
        straddle = off > 29
        w1 = tl.load(row_ptr + word + 1, mask=mask & straddle, other=0).to(tl.uint32, bitcast=True)
        up = tl.where(straddle, 32 - off, 0).to(tl.uint32)
        v = v | tl.where(straddle, w1 << up, 0)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, n, k, mask_n, mask_k, k0,
                  stride_qw, stride_s, stride_z,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr,
                  ACT_ORDER: tl.constexpr, ONE_GROUP: tl.constexpr):
    """fp32 weights ``W[n, k]`` for a tile; ``n``/``k`` are broadcastable index tensors
    (``[BN, 1]``/``[1, BK]`` for a row-major tile, ``[1, BN]``/``[BK, 1]`` for a K-major one).

    ONE_GROUP: the whole K range of this tile (starting at ``k0``) lies in one group, so
    scales and zeros are one value per row instead of one per element.
    """
    mask = mask_n & mask_k
    q = _unpack_codes(qw_ptr + n * stride_qw, k, mask, BITS)
    if ONE_GROUP:
        if GROUP_SIZE == -1:
            g = k0 * 0
        else:
            g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + n * stride_s + g, mask=mask_n, other=0).to(tl.float32)
        if SYM:
            z = (1 << (BITS - 1)) + 0 * n
        else:
            z = _unpack_codes(z_ptr + g * stride_z, n, mask_n, BITS)
    else:
        if ACT_ORDER:
            g = tl.load(g_ptr + k, mask=mask_k, other=0)
        else:
            g = k // GROUP_SIZE
        s = tl.load(s_ptr + n * stride_s + g, mask=mask, other=0).to(tl.float32)
        if SYM:
            z = (1 << (BITS - 1)) + 0 * q
        else:
            z = _unpack_codes(z_ptr + g * stride_z, n, mask, BITS)
    return (q - z).to(tl.float32) * s
