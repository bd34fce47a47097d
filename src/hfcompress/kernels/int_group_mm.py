"""Launcher of the int_group kernels: ``y = x @ dequantize(W)^T + bias`` on CUDA tensors (or CPU
tensors under ``TRITON_INTERPRET=1``). Same signature as ``hfcompress.ops.int_group_mm.int_group_mm_ref``.

On the first call for a layer its stored v1 tensors are converted once into the GPU layout
(``gpu_layout.gpu_layout``: cached outside ``state_dict``, keyed by the packed weight). Act-order
layers gather ``x[:, perm]`` (the layout's K order) so no kernel reads ``g_idx``.

Autotuning: on the first call for a (M bucket, N, K, format, dtype, device) key every pruned
candidate (``configs.candidates``: GEMV / split-K / GEMM / dense by M, plus torch's tinygemm
where it runs) is timed with CUDA-graph replay and the fastest is kept (``tuned()`` lists the
choices). Nothing touches CUDA before the first call.
"""

from __future__ import annotations

import os

import torch
import triton

from . import tinygemm
from .configs import (CONFIGS, INTERPRETER_CONFIGS, TINYGEMM, KernelConfig, candidates, family, gemv_block_m,
                      kind_for, prune)
from .gpu_layout import GpuLayout, gpu_layout
from .int_group_gemm import _int_group_dequant_kernel, _int_group_gemm_kernel
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
    """``x [..., K]`` -> ``[..., N]``. ``config`` forces one launch configuration (tests, benchmarks)."""
    _check(x, qweight, scale, qzero, g_idx, bits, sym, in_features)
    lay = gpu_layout(qweight, scale, qzero, g_idx, bits, group_size, sym, in_features)
    k, n = in_features, lay.n
    x2 = x.reshape(-1, k)
    if lay.perm is not None:
        x2 = x2[:, lay.perm]  # the layout's K order (groups contiguous)
    elif x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        a = _Launch(x2, lay, bias, out)
        a.run(config or _choose(a))
    return out.reshape(*x.shape[:-1], n)


class _Launch:
    """One problem; ``run(config)`` launches it with a configuration."""

    def __init__(self, x, lay: GpuLayout, bias, out):
        self.x, self.lay, self.bias, self.out = x, lay, bias, out
        self.m, self.k = x.shape
        self.n = lay.n
        # the interpreter has no bf16 arithmetic: its tl.dot runs in fp32
        self.dot_fp32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)

    def key(self) -> tuple:
        lay = self.lay
        return (_m_bucket(self.m), self.n, self.k, lay.bits, lay.sg, lay.sym, lay.perm is not None,
                self.x.dtype, self.x.device)

    def run(self, cfg: KernelConfig) -> None:
        lay, m, n, k = self.lay, self.m, self.n, self.k
        if cfg.kind == "tinygemm":
            prep = lay.extra.get("tinygemm")
            if prep is None:
                prep = lay.extra["tinygemm"] = tinygemm.prepare(lay)
            y = tinygemm.mm(self.x.contiguous(), prep)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            self.out.copy_(y)
            return
        qh = lay.codes_hi if lay.codes_hi is not None else lay.codes  # never read unless 3-bit
        z = lay.zero if lay.zero is not None else lay.scale  # never read when symmetric
        layout = dict(BITS=lay.bits, SG=lay.sg, SYM=lay.sym, KI=lay.ki)
        if cfg.kind == "dense":
            w = torch.empty(n, lay.k_pad, dtype=self.x.dtype, device=self.x.device)
            grid = (triton.cdiv(n, cfg.block_n), lay.k_pad // lay.ki)
            _int_group_dequant_kernel[grid](lay.codes, qh, lay.scale, z, w, n, lay.codes.stride(0), qh.stride(0),
                                            w.stride(0), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, **layout)
            torch.matmul(self.x, w[:, :k].t(), out=self.out)
            if self.bias is not None:
                self.out += self.bias.to(self.out.dtype)
            return
        target = self.out if cfg.split_k == 1 else torch.zeros(m, n, dtype=torch.float32, device=self.out.device)
        b = self.bias if self.bias is not None else self.out  # never read without bias
        args = (self.x, lay.codes, qh, lay.scale, z, b, target, m, n, k, self.x.stride(0), lay.codes.stride(0),
                qh.stride(0), target.stride(0))
        common = dict(HAS_BIAS=self.bias is not None, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, **layout)
        if cfg.kind == "gemv":
            bm = gemv_block_m(m)
            for m0 in range(0, m, bm):  # M <= 4 in one launch; more rows (forced configs) in slices
                sliced = (self.x[m0:],) + args[1:6] + (target[m0:], min(bm, m - m0)) + args[8:]
                _int_group_gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](*sliced, BLOCK_M=bm, **common)
        else:
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
            _int_group_gemm_kernel[grid](*args, DOT_FP32=self.dot_fp32, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
                                         **common)
        if cfg.split_k > 1:
            if self.bias is not None:
                target += self.bias.to(torch.float32)
            self.out.copy_(target)


def _m_bucket(m: int) -> int:
    return m if m <= 4 else 1 << (m - 1).bit_length()


def _per(lay: GpuLayout) -> int:
    return 32 // lay.lo_bits


def _choose(a: _Launch) -> KernelConfig:
    lay = a.lay
    if interpreting():
        return prune([INTERPRETER_CONFIGS[kind_for(a.m)]], a.m, a.n, a.k, lay.ki, _per(lay))[0]
    key = a.key()
    if key in _TUNED:
        return _TUNED[key]
    fam = family(torch.cuda.get_device_capability(a.x.device))
    cands = prune(candidates(fam, a.m), a.m, a.n, a.k, lay.ki, _per(lay))
    if tinygemm.eligible(lay, a.x.dtype) and a.x.device.type == "cuda":
        cands.append(TINYGEMM)
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        try:
            a.run(cfg)  # compile (and prepare) outside the timed graph
            # graph replay: at decode sizes launch overhead would otherwise hide the kernel time
            ms = triton.testing.do_bench_cudagraph(lambda: a.run(cfg), rep=20)
        except (triton.runtime.errors.OutOfResources, RuntimeError):
            continue  # e.g. shared memory over this device's limit: not a candidate here
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best_ms == float("inf"):
        raise RuntimeError(f"int_group_mm_triton: no configuration could run {key}: {[c.name for c in cands]}")
    _TUNED[key] = best
    return best


__all__ = ["int_group_mm_triton", "tuned", "CONFIGS", "KernelConfig"]
