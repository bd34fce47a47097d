"""Launcher of the int_group kernels: ``y = x @ dequantize(W)^T + bias`` on CUDA tensors
(or CPU tensors under ``TRITON_INTERPRET=1``), dispatched by M to the GEMV, split-K GEMM or
tiled GEMM kernel. Same signature as ``hfcompress.ops.int_group_mm.int_group_mm_ref``.

Autotuning: on the first call for a (kind, M bucket, N, K, format, dtype, device) key every
pruned candidate of ``configs.CONFIGS[family][kind]`` is timed with ``triton.testing.do_bench``
and the fastest is cached (``tuned()`` lists the choices). Nothing touches CUDA before the
first call.
"""

from __future__ import annotations

import os

import torch
import triton

from .configs import CONFIGS, INTERPRETER_CONFIGS, KernelConfig, family, gemv_block_m, kind_for, prune
from .int_group_gemm import _int_group_gemm_kernel
from .int_group_gemv import _int_group_gemv_kernel

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TUNED: dict[tuple, KernelConfig] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tuned() -> dict[tuple, KernelConfig]:
    """The configuration chosen for every key seen so far (a copy)."""
    return dict(_TUNED)


def _check(x, qweight, scale, qzero, g_idx, bits, sym, in_features):
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"int_group_mm_triton: activations of dtype {x.dtype} are not supported; "
                        f"use one of {ACTIVATION_DTYPES}")
    if x.shape[-1] != in_features:
        raise ValueError(f"int_group_mm_triton: x has {x.shape[-1]} input features, the layer has {in_features}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"int_group_mm_triton: bits={bits} is not supported (2, 3, 4, 8)")
    if qweight.dtype != torch.int32 or qweight.shape[1] != -(-in_features // 32) * bits:
        raise ValueError(f"int_group_mm_triton: qweight must be int32 [N, ceil(K/32)*bits], got "
                         f"{qweight.dtype} {tuple(qweight.shape)} for K={in_features}, bits={bits}")
    if not sym and qzero is None:
        raise ValueError("int_group_mm_triton: an asymmetric layer needs its packed zeros (qzero is None)")
    devices = {t.device for t in (x, qweight, scale, qzero, g_idx) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"int_group_mm_triton: tensors are on different devices {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"int_group_mm_triton runs on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                         "before importing hfcompress.kernels to run it on CPU")


def int_group_mm_triton(x, qweight, scale, qzero, g_idx, bias, bits: int, group_size: int, sym: bool,
                        in_features: int, *, config: KernelConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]``. ``config`` forces one launch configuration (tests)."""
    _check(x, qweight, scale, qzero, g_idx, bits, sym, in_features)
    k, n = in_features, qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        a = _Launch(x2, qweight.contiguous(), scale.contiguous(),
                    None if qzero is None else qzero.contiguous(),
                    None if g_idx is None else g_idx.to(torch.int32).contiguous(),
                    bias, bits, group_size, sym, out)
        a.run(config or _choose(a))
    return out.reshape(*x.shape[:-1], n)


class _Launch:
    """One problem; ``run(config)`` launches it with a configuration."""

    def __init__(self, x, qw, s, z, g, bias, bits, group_size, sym, out):
        self.x, self.qw, self.s, self.z, self.g, self.bias, self.out = x, qw, s, z, g, bias, out
        self.m, self.k = x.shape
        self.n = qw.shape[0]
        self.bits, self.sym, self.act_order = bits, sym, g is not None
        # act-order groups come from g_idx; -1 also means one group per output channel
        self.group_size = -1 if (g is not None or group_size == -1 or s.shape[1] == 1) else group_size
        bf16_interp = interpreting() and x.dtype == torch.bfloat16  # the interpreter has no bf16 math
        self.round_w = x.dtype != torch.float32 and not bf16_interp
        self.dot_fp32 = x.dtype == torch.float32 or bf16_interp

    def key(self) -> tuple:
        return (kind_for(self.m), gemv_block_m(min(self.m, 1 << 20)), self.n, self.k, self.bits, self.group_size,
                self.sym, self.act_order, self.x.dtype, self.x.device)

    def run(self, cfg: KernelConfig) -> None:
        m, n, k = self.m, self.n, self.k
        target = self.out if cfg.split_k == 1 else torch.zeros(m, n, dtype=torch.float32, device=self.out.device)
        dummy = self.qw  # stands in for absent optional tensors (never read: constexpr branches)
        z = self.z if self.z is not None else dummy
        g = self.g if self.g is not None else dummy
        b = self.bias if self.bias is not None else dummy
        common = dict(BITS=self.bits, GROUP_SIZE=self.group_size, SYM=self.sym, ACT_ORDER=self.act_order,
                      HAS_BIAS=self.bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        args = (self.x, self.qw, self.s, z, g, b, target, m, n, k, self.x.stride(0), self.qw.stride(0),
                self.s.stride(0), z.stride(0), target.stride(0))
        if cfg.kind == "gemv":
            grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
            _int_group_gemv_kernel[grid](*args, ROUND_W=self.round_w, BLOCK_M=gemv_block_m(m), **common)
        else:
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
            _int_group_gemm_kernel[grid](*args, DOT_FP32=self.dot_fp32, BLOCK_M=cfg.block_m,
                                         GROUP_M=cfg.group_m, **common)
        if cfg.split_k > 1:
            if self.bias is not None:
                target += self.bias.to(torch.float32)
            self.out.copy_(target)


def _choose(a: _Launch) -> KernelConfig:
    kind = kind_for(a.m)
    if interpreting():
        return prune([INTERPRETER_CONFIGS[kind]], a.m, a.n, a.k)[0]
    key = a.key()
    if key in _TUNED:
        return _TUNED[key]
    fam = family(torch.cuda.get_device_capability(a.x.device))
    candidates = prune(CONFIGS[fam][kind], a.m, a.n, a.k)
    best, best_ms = candidates[0], float("inf")
    if len(candidates) > 1:
        for cfg in candidates:
            try:  # graph replay: at decode sizes launch overhead would otherwise hide the kernel time
                ms = triton.testing.do_bench_cudagraph(lambda: a.run(cfg), rep=20)
            except triton.runtime.errors.OutOfResources:
                continue  # e.g. shared memory over this device's limit: not a candidate here
            if ms < best_ms:
                best, best_ms = cfg, ms
    if best_ms == float("inf") and len(candidates) > 1:
        raise triton.runtime.errors.OutOfResources(0, 0, f"every {kind} configuration for {key}")
    _TUNED[key] = best
    return best
