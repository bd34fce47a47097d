"""Ahead-of-time compilation of every shipped kernel configuration for its GPU target (sm_80
for the Ampere list, sm_90 for the Hopper list), on CPU: a configuration that would fail only
on a device (tl.dot shape minimums, shared memory over the per-block limit) fails here.
Each is compiled in its heaviest variant (fp32 activations, 3-bit bit planes, asymmetric, bias)
and the production variant (bf16, 4-bit, group 128)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from hfcompress.kernels.aot import SMEM_LIMIT, compile_config, shipped  # noqa: E402
from hfcompress.kernels.configs import CONFIGS, KernelConfig, candidates, prune  # noqa: E402

SHIPPED = shipped()


@pytest.mark.parametrize("capability,config", SHIPPED, ids=[f"sm{c}-{cfg.name}" for c, cfg in SHIPPED])
def test_kernels_aot_compiles_within_limits(capability, config):
    compiled = compile_config(config, capability)
    assert compiled.metadata.shared <= SMEM_LIMIT[capability], (
        f"{config.name} needs {compiled.metadata.shared} B of shared memory on sm_{capability}, "
        f"the limit is {SMEM_LIMIT[capability]} B")
    assert compiled.asm.get("cubin"), "no cubin produced"


@pytest.mark.parametrize("kind", ["splitk", "gemm", "dense"])
def test_kernels_aot_common_variant_sm90(kind):
    """The production path: bf16, 4-bit, group 128 asymmetric (the GEMV's is in test_kernels_ptx.py)."""
    config = CONFIGS["sm90"][kind][0]
    compiled = compile_config(config, 90, dtype=torch.bfloat16, bits=4, group_size=128, sym=False)
    assert compiled.metadata.shared <= SMEM_LIMIT[90] and compiled.asm.get("cubin")


def test_kernels_configs_prune_and_validate():
    gemv = CONFIGS["sm90"]["gemv"]
    # 4-bit, KI = 128: 16 words per row per tile; every kept GEMV gives each thread >= one 128-bit load
    kept = prune(gemv, m=1, n=4096, k=4096, ki=128, per=8)
    assert kept and all(c.block_n * 16 >= 4 * 32 * c.num_warps for c in kept)
    # a 64-wide problem keeps only tiles that fit it; split-K needs two K blocks per slice
    small = prune(gemv, m=1, n=64, k=256, ki=128, per=8)
    assert small and all(c.block_n <= 64 and c.split_k == 1 for c in small)
    assert {c.kind for c in candidates("sm90", 1)} == {"gemv", "splitk"}
    assert "dense" in {c.kind for c in candidates("sm90", 512)}
    with pytest.raises(ValueError, match="block_m, block_n >= 16"):
        KernelConfig("gemm", block_m=8, block_n=64)
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig("gemv", block_n=24)
    with pytest.raises(ValueError, match="kind="):
        KernelConfig("gemmm", block_m=16, block_n=64)


def test_kernels_import_touches_nothing():
    """``import hfcompress`` defines no kernel (the kernel modules load on first use) and does not
    initialise CUDA. (torch itself may import the triton package; our kernels are what is lazy.)"""
    code = ("import sys, hfcompress, hfcompress.kernels, torch; "
            "loaded = [m for m in sys.modules if m.startswith('hfcompress.kernels.')]; "
            "assert not loaded, f'kernel modules imported: {loaded}'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-3000:]
