"""The GPU runtime layout (hfcompress.kernels.gpu_layout) on CPU: pure torch, so every case is
checked here, bit for bit, against the format's reference dequantize; plus the cache contract
(built once, rebuilt after an in-place change, never in state_dict / save_pretrained) and the
tinygemm backend's scales_and_zeros math against PyTorch's CPU int4 matmul (same semantics)."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import inputs, llama_gqa, sqnr_db

import hfcompress
from hfcompress.formats.int_group import IntGroupSpec, dequantize
from hfcompress.kernels import gpu_layout as gl
from hfcompress.kernels import tinygemm
from hfcompress.nn import QuantLinear
from hfcompress.nn.quant_linear import pack

N, K = 70, 200  # odd: no tile multiple, a ragged last group, a padded bit stream


def _tensors(bits, gs, sym, act, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs == -1 else -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    zero = None if sym else torch.randint(0, 1 << bits, (n, n_groups), generator=g)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)] if act else None
    spec = IntGroupSpec(bits=bits, group_size=gs, sym=sym, act_order=act)
    t = pack(codes, scale, zero, g_idx, spec)
    return spec, (t["weight"], t["weight_scale"], t.get("weight_zero"), t.get("weight_g_idx"))


CASES = [c for c in itertools.product((2, 3, 4, 8), (True, False), (32, 64, 40, -1), (False, True))
         if not (c[2] == -1 and c[3])]


@pytest.mark.parametrize("bits,sym,gs,act", CASES,
                         ids=[f"b{b}-{'sym' if s else 'asym'}-g{g}{'-act' if a else ''}" for b, s, g, a in CASES])
def test_kernels_layout_round_trip_bit_exact(bits, sym, gs, act):
    spec, (qw, s, z, gi) = _tensors(bits, gs, sym, act, seed=bits * 100 + gs)
    ref = dequantize(qw, s, z, gi, spec, K)
    lay = gl.build_layout(qw, s, z, gi, bits, gs, sym, K)
    assert torch.equal(gl.dequantize_layout(lay), ref)
    # the promises of the layout itself
    per = 32 // lay.lo_bits
    assert lay.k_pad % gl.K_ALIGN == 0 and lay.codes.shape == (N, lay.k_pad // per)
    assert lay.codes.stride(0) * 4 % 16 == 0, "rows must start 16-byte aligned (128-bit loads)"
    assert lay.sg & (lay.sg - 1) == 0 and lay.ki % (4 * per) == 0 and lay.k_pad % lay.ki == 0
    assert lay.scale.shape == (lay.k_pad // lay.sg if lay.sg < lay.k_pad else 1, N)
    assert lay.scale.dtype == torch.float16 and (lay.zero is None) == sym
    if bits == 3:
        assert lay.codes_hi.dtype == torch.int16 and lay.codes_hi.shape == (N, lay.k_pad // 16)
    if gs in (32, 64):
        assert lay.sg == gs  # power-of-two groups keep their size: one scale per row per K tile
    if gs == 40:
        assert lay.sg == 8  # 40 = 5 x 8: sub-groups of 8 sharing their group's scale
    if act:  # groups contiguous in the layout's K order
        g_sorted = gi.long()[lay.perm]
        assert torch.equal(g_sorted, torch.sort(gi.long()).values)


def test_kernels_layout_interleave_lines_codes_up_with_contiguous_columns():
    """Code j of word w of a block is column j * wk + w (what the GEMV relies on)."""
    bits, k = 4, 256
    codes = torch.arange(k).remainder(16).repeat(3, 1)  # column c holds c % 16
    spec = IntGroupSpec(bits=bits, group_size=128, sym=True)
    t = pack(codes, torch.ones(3, 2), None, None, spec)
    lay = gl.build_layout(t["weight"], t["weight_scale"], None, None, bits, 128, True, k)
    assert lay.ki == 128
    wk = lay.ki // 8
    words = lay.codes.to(torch.int64) & 0xFFFFFFFF
    for w in (0, 3, wk - 1):
        for j in (0, 5, 7):
            assert int((words[0, w] >> (4 * j)) & 15) == (j * wk + w) % 16


def test_kernels_layout_cache_built_once_rebuilt_after_change():
    import gc

    spec, (qw, s, z, gi) = _tensors(4, 64, False, True, seed=3)
    gc.collect()  # earlier tests' layers must not be collected in the middle of the count
    before = gl.cached_layouts()
    a = gl.gpu_layout(qw, s, z, gi, 4, 64, False, K)
    assert gl.gpu_layout(qw, s, z, gi, 4, 64, False, K) is a
    assert gl.cached_layouts() == before + 1
    s.mul_(2)  # in place: the cache must notice
    b = gl.gpu_layout(qw, s, z, gi, 4, 64, False, K)
    assert b is not a and torch.equal(gl.dequantize_layout(b), dequantize(qw, s, z, gi, spec, K))
    del qw, a, b
    gc.collect()
    assert gl.cached_layouts() == before  # dropped with the packed tensor


def test_kernels_layout_save_pretrained_writes_v1_tensors_with_cache_populated(tmp_path):
    torch.manual_seed(0)
    model = hfcompress.quantize_(llama_gqa(), hfcompress.RTNConfig(bits=3, group_size=32))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    stored = {f"{n}.{b}": t.clone() for n, m in layers.items() for b, t in m.named_buffers()}
    keys = list(model.state_dict())
    for m in layers.values():  # what the first CUDA forward does
        gl.gpu_layout(m.weight, m.weight_scale, m.weight_zero, m.weight_g_idx, m.spec.bits, m.spec.group_size,
                      m.spec.sym, m.in_features)
    assert gl.cached_layouts() >= len(layers)
    assert list(model.state_dict()) == keys  # the cache adds nothing to the state_dict
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name, t in stored.items():
        assert saved[name].dtype == t.dtype and torch.equal(saved[name], t), name
    assert not any("codes" in k or "layout" in k for k in saved)
    ids = inputs()
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("sym,gs,act", [(False, 128, False), (True, 64, True), (False, -1, False)])
def test_kernels_tinygemm_scales_and_zeros_match_reference_on_cpu(sym, gs, act):
    """tinygemm's ``(q - 8) * s + (8 - z) * s`` form, through the CPU int4 op that shares its
    scales_and_zeros semantics (the CUDA op itself needs a GPU: untested here)."""
    n, k = 48, 512
    spec, (qw, s, z, gi) = _tensors(4, gs, sym, act, n=n, k=k, seed=11)
    lay = gl.build_layout(qw, s, z, gi, 4, gs, sym, k)
    assert tinygemm.eligible(lay, torch.bfloat16) and not tinygemm.eligible(lay, torch.float16)
    c = tinygemm.codes(lay)  # [N, K] in kernel column order
    # the CUDA op's uint8 input: even column in the high nibble
    nib = tinygemm.nibbles(c)
    assert torch.equal(torch.stack([nib >> 4, nib & 15], -1).reshape(n, k).to(torch.int32), c)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    xk = x[:, lay.perm] if lay.perm is not None else x
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, packed, tinygemm.group_size(lay), tinygemm.scales_and_zeros(lay))
    ref = x.float() @ dequantize(qw, s, z, gi, spec, k).t()
    assert sqnr_db(ref, y.float()) > 40  # bf16 scales and activations: bf16-level agreement
