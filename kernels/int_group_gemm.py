"""Tiled GEMM on tensor cores (``tl.dot``) for M > 8: the dequantized ``[BLOCK_K, BLOCK_N]``
weight tile is cast to the activation dtype (fp32 activations use ieee fp32 dot, no TF32).
``SPLIT_K == 1`` is the tiled GEMM for large M (output written directly, bias fused);
``SPLIT_K > 1`` is the split-K GEMM for small M (fp32 atomics into a zeroed workspace), which
keeps enough programs in flight when there are few M tiles."""

import triton
import triton.language as tl

from .int_group_tile import _dequant_tile


@triton.jit
def _int_group_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_s, stride_z, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, ACT_ORDER: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # x [M, K], packed W [N, K*BITS/32], out [M, N]
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # programs sharing weight columns run close together (L2 reuse of the packed tile)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)  # [BM, BK]
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_n[None, :], offs_k[:, None],
                          mask_n[None, :], mask_k[:, None], k0, stride_qw, stride_s, stride_z,
                          BITS, GROUP_SIZE, SYM, ACT_ORDER, ONE_GROUP)  # [BK, BN] fp32
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
