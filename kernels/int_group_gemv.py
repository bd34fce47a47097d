"""GEMV for decode (M = 1..8): each program dequantizes a ``[BLOCK_N, BLOCK_K]`` weight tile
once and reduces it against all M rows of x on the CUDA cores (no tensor cores: at M <= 8
the kernel is bound by reading the packed weights). Optional split-K over a grid axis,
accumulated with fp32 atomics into a zeroed workspace."""

import triton
import triton.language as tl

from .int_group_tile import _dequant_tile


@triton.jit
def _int_group_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_s, stride_z, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, ACT_ORDER: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUND_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # x [M, K] (M <= BLOCK_M), packed W [N, K*BITS/32], out [M, N] (fp32 workspace when SPLIT_K > 1)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ONE_GROUP: tl.constexpr = (not ACT_ORDER) and (GROUP_SIZE == -1 or GROUP_SIZE % BLOCK_K == 0)

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum((pid_k + 1) * per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_n[:, None], offs_k[None, :],
                          mask_n[:, None], mask_k[None, :], k0, stride_qw, stride_s, stride_z,
                          BITS, GROUP_SIZE, SYM, ACT_ORDER, ONE_GROUP)  # [BN, BK] fp32
        if ROUND_W:  # the weight rounded to the activation dtype, as the reference computes with
            w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BM, BN]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
