"""Ahead-of-time compilation of the shipped kernel configurations for real GPU targets,
without a GPU (Triton ships ptxas): catches what only fails on a device (tl.dot shape
minimums, shared memory over the per-block limit, register blow-ups in the tile math), and
gives the PTX that tests/test_kernels_ptx.py reads."""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import CONFIGS, GEMV_MAX_M, KernelConfig, gemv_block_m
from .gpu_layout import block_width
from .int_group_gemm import _int_group_dequant_kernel, _int_group_gemm_kernel
from .int_group_gemv import _int_group_gemv_kernel

#: largest dynamic shared memory one block may use (bytes): A100 (sm_80), H100/H200 (sm_90)
SMEM_LIMIT = {80: 166912, 90: 232448}
#: which family's configurations run on which compile target
TARGETS = {"sm80": 80, "sm90": 90}
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def shipped() -> list[tuple[int, KernelConfig]]:
    """Every (compute capability, Triton config) pair the autotuner may launch."""
    return [(cap, cfg) for fam, cap in TARGETS.items() for kind in CONFIGS[fam] for cfg in CONFIGS[fam][kind]]


def compile_config(cfg: KernelConfig, capability: int, *, dtype: torch.dtype = torch.float32, bits: int = 3,
                   group_size: int = 128, sym: bool = False, has_bias: bool = True, block_m: int | None = None):
    """Compile one configuration for ``sm_<capability>``; returns triton's CompiledKernel.

    ``group_size`` is the layout's sub-group (a power of two; the K tile follows from it). The
    defaults are the heaviest variant: fp32 activations, 3-bit (two bit planes), asymmetric, bias.
    """
    act = _TYPES[dtype]
    consts = dict(BITS=bits, SG=group_size, SYM=sym, KI=block_width(bits, group_size))
    ptrs = {"qw_ptr": "i32", "qh_ptr": "i16" if bits == 3 else "i32", "s_ptr": "fp16", "z_ptr": "fp16"}
    if cfg.kind == "dense":
        fn = _int_group_dequant_kernel
        ptrs["w_ptr"] = act
        consts["BLOCK_N"] = cfg.block_n
    else:
        ptrs.update(x_ptr=act, b_ptr=act, out_ptr=act if cfg.split_k == 1 else "fp32")
        consts.update(HAS_BIAS=has_bias, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k)
        if cfg.kind == "gemv":
            fn = _int_group_gemv_kernel
            consts["BLOCK_M"] = block_m or gemv_block_m(GEMV_MAX_M)
        else:
            fn = _int_group_gemm_kernel
            consts.update(DOT_FP32=dtype == torch.float32, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m)
    signature = {a: ("*" + ptrs[a]) if a in ptrs else "constexpr" if a in consts else "i32" for a in fn.arg_names}
    # pointers 16-byte aligned and strides multiples of 16, as the JIT specialises them on a GPU
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in ptrs or a.startswith("stride") or a in ("N", "K")}
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True))
