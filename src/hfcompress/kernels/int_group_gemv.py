"""GEMV for decode (M = 1..4): each program streams ``[BLOCK_N, KI]`` weight tiles (packed words
loaded once per tile with 128-bit vector loads, the next tile's requested before this one is
computed), expands code ``j`` of every word with a shift, dequantizes it with one fma
(``w = q * s + c``) and multiplies it with the matching contiguous run of activations on the
CUDA cores (at M <= 4 tensor cores buy nothing). Tiles never cross a sub-group, so scales and
zeros are one load per row per tile. Partial sums stay per thread across K tiles (one
``[BN, WK]`` accumulator per activation row) and are reduced once at the end. Optional split-K
over a grid axis, accumulated with fp32 atomics into a zeroed workspace.

The loop body is about six ALU instructions per code (bit-field extract, or, sub, two fma,
the activation's bf16->fp32 conversion; see tests/test_kernels_ptx.py): whether the kernel is
then bound by HBM or by those instructions on a given GPU is for benchmarks/gpu_kernels.py to
measure."""

import triton
import triton.language as tl

from .int_group_tile import _as_f32, _code, _load_words, _scale_zero


@triton.jit
def _int_group_gemv_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_qh, stride_om,
    BITS: tl.constexpr, SG: tl.constexpr, SYM: tl.constexpr, KI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # x [M, K] (M <= BLOCK_M <= 4, columns already in kernel order), out [M, N] (fp32 workspace if SPLIT_K > 1)
    LB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LB
    WK: tl.constexpr = KI // PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, WK)

    k_tiles = tl.cdiv(K, KI)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum((pid_k + 1) * per_split, k_tiles)
    # one [BN, WK] accumulator per activation row (BLOCK_M <= 4), all in the words' register layout
    acc0 = tl.zeros((BLOCK_N, WK), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, WK), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, WK), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, WK), dtype=tl.float32)
    # software pipelining in registers: the next tile's words, scales and zeros are requested
    # before this tile is computed, so a thread always has a tile of loads in flight
    t0 = pid_k * per_split
    more = offs_n * 0 + t0 < t_end  # [BN] (a tensor: the interpreter rejects scalar masks)
    words, hi = _load_words(qw_ptr, qh_ptr, offs_n, mask_n & more, t0 * KI, stride_qw, stride_qh, BITS, KI)
    s, c = _scale_zero(s_ptr, z_ptr, offs_n, mask_n & more, t0 * KI, N, 0, BITS, SG, SYM, KI)
    for t in range(t0, t_end):
        k0 = t * KI
        more = offs_n * 0 + t + 1 < t_end
        words_next, hi_next = _load_words(qw_ptr, qh_ptr, offs_n, mask_n & more, k0 + KI, stride_qw, stride_qh,
                                          BITS, KI)
        s_next, c_next = _scale_zero(s_ptr, z_ptr, offs_n, mask_n & more, k0 + KI, N, 0, BITS, SG, SYM, KI)
        for j in tl.static_range(PER):
            if j > 0 and SG < KI:
                s, c = _scale_zero(s_ptr, z_ptr, offs_n, mask_n, k0, N, j, BITS, SG, SYM, KI)
            w = _as_f32(_code(words, hi, j, BITS)) * s + c  # [BN, WK], one fma per code
            # columns of code j: one contiguous run; broadcast over the rows, so each thread reads
            # the activations of its own words (cache hits after the first warp)
            kk = (k0 + j * WK + offs_w)[None, :] + 0 * offs_n[:, None]  # [BN, WK]
            acc0 += w * _x(x_ptr, kk, K, 0, M, stride_xm)
            if BLOCK_M > 1:
                acc1 += w * _x(x_ptr, kk, K, 1, M, stride_xm)
            if BLOCK_M > 2:
                acc2 += w * _x(x_ptr, kk, K, 2, M, stride_xm)
                acc3 += w * _x(x_ptr, kk, K, 3, M, stride_xm)
        words, hi, s, c = words_next, hi_next, s_next, c_next

    out_ptrs = out_ptr + offs_n
    _store_row(out_ptrs, b_ptr, acc0, offs_n, mask_n, 0, M, stride_om, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 1:
        _store_row(out_ptrs, b_ptr, acc1, offs_n, mask_n, 1, M, stride_om, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 2:
        _store_row(out_ptrs, b_ptr, acc2, offs_n, mask_n, 2, M, stride_om, HAS_BIAS, SPLIT_K)
        _store_row(out_ptrs, b_ptr, acc3, offs_n, mask_n, 3, M, stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _x(x_ptr, kk, K, row: tl.constexpr, M, stride_xm):
    """Activations of row ``row`` at columns ``kk`` (fp32; zero past K or past M)."""
    return tl.load(x_ptr + row * stride_xm + kk, mask=(kk < K) & (kk * 0 + row < M), other=0,
                   eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _store_row(out_ptrs, b_ptr, acc, offs_n, mask_n, row: tl.constexpr, M, stride_om,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    out = tl.sum(acc, axis=1)  # [BN]
    mask = mask_n & (offs_n * 0 + row < M)
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        tl.store(out_ptrs + row * stride_om, out.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs + row * stride_om, out, mask=mask)
