"""Triton kernels vs the reference on CPU, under TRITON_INTERPRET=1.

The interpreter must be switched on before the kernels are defined, and must not leak into
other tests, so each test runs its cases in a fresh subprocess (``_worker`` below) and checks
the per-case results it reports. Shapes are odd (N=70, K=200: not multiples of any tile, a
ragged last group, a padded bit stream) and M covers every path: GEMV (1..4), split-K
(16, 33), tiled GEMM (70), the dense path and split-K GEMV (forced); groups of 32 / 64 (one
scale per tile), 40 (sub-groups of 8: scales per code position) and per-channel; act-order
(the layout's permuted K, activations gathered). bf16 runs through the fp32 upcast (the
interpreter has no bf16 arithmetic) and its stores truncate, hence its looser bound.
"""

from __future__ import annotations

import json
import os

import pytest
from interpreter import run_interpreter_worker

N, K = 70, 200
#: minimum SQNR (dB) of kernel output vs the reference, per activation dtype
MIN_SQNR_DB = {"float32": 100.0, "float16": 55.0, "bfloat16": 35.0}

# (M, group_size, sym, act_order, dtype, bias, forced config or None)
CASES = [
    (1, 32, False, False, "float32", True, None),
    (1, 64, True, False, "bfloat16", False, None),
    (3, -1, False, False, "float16", True, None),
    (2, 64, False, True, "float32", False, None),
    (1, 40, False, True, "float32", True, None),
    (16, 32, True, False, "float16", False, None),
    (16, 64, False, True, "bfloat16", True, None),
    (33, 40, False, False, "float32", False, None),
    (70, 64, True, True, "float32", True, None),
    (2, 32, False, False, "float32", True, dict(kind="gemv", block_n=64, split_k=2, num_warps=1)),
    (20, 64, False, True, "float16", True, dict(kind="dense", block_n=32)),
]

def _case_id(c):
    m, gs, sym, act, dtype, bias, cfg = c
    return (f"m{m}-g{gs}-{'sym' if sym else 'asym'}{'-act' if act else ''}-{dtype}{'-bias' if bias else ''}"
            f"{'-' + cfg['kind'] + 'forced' if cfg else ''}")


def _worker(bits: int, opcheck: bool) -> None:  # runs in the subprocess, TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from hfcompress.formats.int_group import IntGroupSpec
    from hfcompress.kernels.configs import KernelConfig
    from hfcompress.kernels.int_group_mm import int_group_mm_triton
    from hfcompress.nn.quant_linear import pack
    from hfcompress.ops.int_group_mm import int_group_mm_ref, register_backend
    from tiny_models import sqnr_db

    def tensors(gs, sym, act, seed):
        g = torch.Generator().manual_seed(seed)
        n_groups = 1 if gs == -1 else -(-K // gs)
        codes = torch.randint(0, 1 << bits, (N, K), generator=g)
        scale = torch.rand(N, n_groups, generator=g) * 0.02 + 0.005
        zero = None if sym else torch.randint(0, 1 << bits, (N, n_groups), generator=g)
        g_idx = None
        if act:  # a random permutation of equal groups, as GPTQ act-order stores it
            g_idx = (torch.arange(K) // gs)[torch.randperm(K, generator=g)]
        spec = IntGroupSpec(bits=bits, group_size=gs, sym=sym, act_order=act)
        t = pack(codes, scale, zero, g_idx, spec)
        return t["weight"], t["weight_scale"], t.get("weight_zero"), t.get("weight_g_idx")

    results = {}
    for i, case in enumerate(CASES):
        m, gs, sym, act, dtype, has_bias, cfg = case
        dt = getattr(torch, dtype)
        qw, s, z, gi = tensors(gs, sym, act, seed=100 * bits + i)
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(m, K, generator=gen).to(dt)
        bias = torch.randn(N, generator=gen).to(dt) if has_bias else None
        args = (x, qw, s, z, gi, bias, bits, gs, sym, K)
        try:
            y = int_group_mm_triton(*args, config=KernelConfig(**cfg) if cfg else None)
            ref = int_group_mm_ref(*args)
            results[_case_id(case)] = dict(sqnr=sqnr_db(ref.float(), y.float()), shape=list(y.shape),
                                           dtype=str(y.dtype).replace("torch.", ""),
                                           finite=bool(torch.isfinite(y).all()))
        except Exception as e:  # reported per case by the test
            results[_case_id(case)] = dict(error=f"{type(e).__name__}: {e}")
    if opcheck:  # the op itself, with the Triton launcher as its CPU implementation
        register_backend("cpu", lambda *a: int_group_mm_triton(*a))
        op = torch.ops.hfcompress.int_group_mm.default
        for m in (1, 16):
            qw, s, z, gi = tensors(64, False, False, seed=7)
            x = torch.randn(m, K, requires_grad=True)
            try:
                torch.library.opcheck(op, (x, qw, s, z, gi, torch.randn(N), bits, 64, False, K))
                results[f"opcheck-m{m}"] = dict(ok=True)
            except Exception as e:
                results[f"opcheck-m{m}"] = dict(error=f"{type(e).__name__}: {e}")
    print("RESULTS " + json.dumps(results))


def _run_worker(bits: int, opcheck: bool) -> dict:
    return run_interpreter_worker("test_kernels_interpret", f"_worker({bits}, {opcheck})")


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"bits{b}")
def test_kernels_interpret_matches_reference(bits):
    results = _run_worker(bits, opcheck=bits == 4)
    failures = []
    for case in CASES:
        cid = _case_id(case)
        r = results[cid]
        if "error" in r:
            failures.append(f"{cid}: {r['error']}")
            continue
        m, dtype = case[0], case[4]
        if r["shape"] != [m, N] or r["dtype"] != dtype or not r["finite"]:
            failures.append(f"{cid}: got shape {r['shape']} dtype {r['dtype']} finite={r['finite']}")
        elif r["sqnr"] < MIN_SQNR_DB[dtype]:
            failures.append(f"{cid}: SQNR {r['sqnr']:.1f} dB < {MIN_SQNR_DB[dtype]} dB")
    for key, r in results.items():
        if key.startswith("opcheck") and "error" in r:
            failures.append(f"{key}: {r['error']}")
    assert not failures, f"bits={bits}: " + "\n".join(failures)
    if bits == 4:
        assert {"opcheck-m1", "opcheck-m16"} <= set(results)
