"""GEMM for M > 4 (tensor cores): each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks
K one interleave block (``KI`` columns) at a time: the block's packed words are loaded once
(128-bit loads), dequantized once for all BLOCK_M rows (one fma per code, columns back in
natural order) and fed to ``tl.dot`` in the activation dtype (fp32 accumulation). Blocks never
cross a sub-group, so scales and zeros are one load per row per block. ``SPLIT_K > 1`` splits
the K blocks over a grid axis (small M: more programs than output tiles), accumulated with fp32
atomics into a zeroed workspace.

Also here: ``_int_group_dequant_kernel``, the dense path for large M (prefill): the whole
weight dequantized once into the activation dtype, then one dense matmul."""

import triton
import triton.language as tl

from .int_group_tile import _dequant_block, _load_words


@triton.jit
def _int_group_gemm_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_qh, stride_om,
    BITS: tl.constexpr, SG: tl.constexpr, SYM: tl.constexpr, KI: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # x [M, K] (columns in kernel order), out [M, N] (fp32 workspace if SPLIT_K > 1)
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

    k_tiles = tl.cdiv(K, KI)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum((pid_k + 1) * per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
        k0 = t * KI
        offs_k = k0 + tl.arange(0, KI)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)  # [BM, KI]
        words, hi = _load_words(qw_ptr, qh_ptr, offs_n, mask_n, k0, stride_qw, stride_qh, BITS, KI)
        w = _dequant_block(words, hi, s_ptr, z_ptr, offs_n, mask_n, k0, N, BITS, SG, SYM, KI)  # [BN, KI]
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _int_group_dequant_kernel(
    qw_ptr, qh_ptr, s_ptr, z_ptr, w_ptr, N, stride_qw, stride_qh, stride_w,
    BITS: tl.constexpr, SG: tl.constexpr, SYM: tl.constexpr, KI: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``W [N, k_pad]`` in the output dtype (columns in kernel order), one block per program."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * KI
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words, hi = _load_words(qw_ptr, qh_ptr, offs_n, mask_n, k0, stride_qw, stride_qh, BITS, KI)
    w = _dequant_block(words, hi, s_ptr, z_ptr, offs_n, mask_n, k0, N, BITS, SG, SYM, KI)  # [BN, KI]
    offs_k = k0 + tl.arange(0, KI)
    tl.store(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask_n[:, None])
