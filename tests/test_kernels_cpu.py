"""The CPU fast path (hfcompress.kernels.cpu): native int4 (also for 2/3-bit codes) / int8 weight-only matmuls.

They compute in bf16, so the tolerance against the fp32 reference is stated as an SQNR
(CPU_MIN_SQNR_DB); by default fp32 activations take it too; ``set_cpu_fast_path("off")`` is the
bit-exact reference."""

from __future__ import annotations

import pytest
import torch

from hfcompress.formats.int_group import IntGroupSpec
from hfcompress.kernels.cpu import int_group_mm_cpu
from hfcompress.nn.quant_linear import QuantLinear, pack
from hfcompress.ops import int_group_mm_ref, set_cpu_fast_path
from tiny_models import sqnr_db

CPU_MIN_SQNR_DB = 40.0  # bf16 compute: measured ~50 dB against the fp32 reference

# (bits, group_size, sym, act_order, N, K): every case the fast path must take
COVERED = [
    (4, 32, False, False, 70, 96),
    (4, 64, True, False, 64, 576),
    (4, 128, False, False, 48, 320),  # ragged last group of 64, split into sub-groups
    (4, -1, False, False, 40, 160),
    (4, 64, False, True, 64, 192),
    (3, 32, False, False, 64, 96),  # 3-bit codes straddle words; they run on the int4 op
    (3, 64, True, False, 70, 576),
    (3, 64, False, True, 64, 192),
    (2, 32, True, False, 64, 96),
    (2, 128, False, False, 48, 320),
    (8, -1, True, False, 70, 96),
    (8, -1, False, False, 64, 160),
]
DECLINED = [
    (3, 32, False, False, 64, 200),  # K not a multiple of 32
    (8, 32, False, False, 64, 96),  # grouped 8-bit: the int8 op has one scale per channel
    (4, 32, False, False, 64, 200),  # K not a multiple of 32
    (8, -1, True, False, 64, 200),  # K % 16 != 0: the int8 op would read out of bounds
]


def _layer(bits, gs, sym, act, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs == -1 else -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    zero = None if sym else torch.randint(0, 1 << bits, (n, n_groups), generator=g)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)] if act else None
    spec = IntGroupSpec(bits=bits, group_size=gs, sym=sym, act_order=act)
    return QuantLinear.from_codes(codes, scale, zero, g_idx, spec, bias=torch.randn(n, generator=g))


def _args(layer, x):
    s = layer.spec
    return (x, layer.weight, layer.weight_scale, layer.weight_zero, layer.weight_g_idx, layer.bias,
            s.bits, s.group_size, s.sym, layer.in_features)


@pytest.fixture
def fast_always():
    previous = set_cpu_fast_path("always")
    yield
    set_cpu_fast_path(previous)


def _id(c):
    bits, gs, sym, act, n, k = c
    return f"bits{bits}-g{gs}-{'sym' if sym else 'asym'}{'-act' if act else ''}-{n}x{k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", COVERED, ids=_id)
def test_kernels_cpu_fast_path_matches_reference(case, dtype):
    layer = _layer(*case)
    x = torch.randn(5, case[-1]).to(dtype)
    y = int_group_mm_cpu(*_args(layer, x))
    assert y is not None, "the fast path declined a case it covers"
    assert y.dtype == dtype and y.shape == (5, case[4])
    ref = int_group_mm_ref(*_args(layer, x.float()))
    assert sqnr_db(ref, y.float()) >= CPU_MIN_SQNR_DB


@pytest.mark.parametrize("case", DECLINED, ids=_id)
def test_kernels_cpu_declines_uncovered_formats(case, fast_always):
    layer = _layer(*case)
    x = torch.randn(3, case[-1])
    assert int_group_mm_cpu(*_args(layer, x)) is None
    torch.testing.assert_close(layer(x), int_group_mm_ref(*_args(layer, x)), rtol=0, atol=0)  # reference ran


def test_kernels_cpu_default_routes_fp32_and_bf16_through_fast_path():
    """No 50x cliff: by default fp32 activations take the fast path too (bf16 compute, fp32 in/out)."""
    layer = _layer(4, 32, False, False, 64, 96)
    x = torch.randn(3, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, int_group_mm_cpu(*_args(layer, x)))  # fp32: the fast path
    assert not torch.equal(y, int_group_mm_ref(*_args(layer, x)))
    assert sqnr_db(int_group_mm_ref(*_args(layer, x)), y) >= CPU_MIN_SQNR_DB
    xb = x.bfloat16()
    assert torch.equal(layer(xb), int_group_mm_cpu(*_args(layer, xb)))  # bf16: the fast path


def test_kernels_cpu_off_mode_is_the_bit_exact_reference():
    layer = _layer(4, 32, False, False, 64, 96)
    x = torch.randn(3, 96)
    previous = set_cpu_fast_path("off")
    try:
        assert torch.equal(layer(x), int_group_mm_ref(*_args(layer, x)))
    finally:
        set_cpu_fast_path(previous)


def test_kernels_cpu_env_var_selects_reference(tmp_path):
    import subprocess
    import sys

    code = ("import torch, hfcompress.ops.backends as b; print(b.cpu_fast_path_mode())")
    env = dict(__import__("os").environ, HFCOMPRESS_CPU_FAST_PATH="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "off"
    env["HFCOMPRESS_CPU_FAST_PATH"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "HFCOMPRESS_CPU_FAST_PATH" in bad.stderr


def test_kernels_cpu_declined_layer_warns_once_naming_it():
    """A layer the fast path cannot serve says so once (its name and why), not per call."""
    import warnings

    from hfcompress.ops import label_layers

    layer = _layer(4, 32, False, False, 64, 200)  # K not a multiple of 32
    model = torch.nn.Sequential()
    model.add_module("proj", layer)
    label_layers(model)
    x = torch.randn(3, 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = model(x)
    msgs = [str(w.message) for w in caught if "fast path" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "proj" in msgs[0] and "200" in msgs[0]
    assert torch.equal(y, int_group_mm_ref(*_args(layer, x)))  # the reference served it


def test_kernels_cpu_forward_uses_dequantized_weight(fast_always):
    """QuantLinear.dequantize() is the weight the fast forward computes with (to bf16 precision)."""
    layer = _layer(4, 64, False, True, 64, 192)
    x = torch.randn(4, 192)
    expected = x @ layer.dequantize(torch.float32).t() + layer.bias
    assert sqnr_db(expected, layer(x)) >= CPU_MIN_SQNR_DB
    assert set(layer.state_dict()) == {"weight", "weight_scale", "weight_zero", "weight_g_idx", "bias"}


def test_kernels_cpu_cache_follows_weight_changes(fast_always):
    layer = _layer(4, 32, False, False, 64, 96, seed=1)
    x = torch.randn(2, 96)
    y1 = layer(x)
    other = _layer(4, 32, False, False, 64, 96, seed=2)
    layer.weight.copy_(other.weight)  # in place: the cached int4 pack must be rebuilt
    layer.weight_scale.copy_(other.weight_scale)
    layer.weight_zero.copy_(other.weight_zero)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    assert sqnr_db(int_group_mm_ref(*_args(layer, x)), y2) >= CPU_MIN_SQNR_DB


def test_kernels_cpu_opcheck():
    layer = _layer(4, 32, False, False, 64, 96)
    x = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    args = _args(layer, x)
    torch.library.opcheck(torch.ops.hfcompress.int_group_mm.default, args[:5] + (layer.bias.bfloat16(),) + args[6:])


def test_kernels_cpu_under_torch_compile():
    """torch.compile traces the op through its fake and runs the fast path inside the graph."""
    layer = _layer(4, 64, False, False, 64, 192)
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, int_group_mm_cpu(*_args(layer, x)))


def test_kernels_cpu_eager_call_skips_the_dispatcher_but_not_autograd():
    """Plain eager inference on CPU calls the op's CPU kernel directly (same numbers as through
    the op, fewer Python round trips); anything that records a graph goes through the op."""
    import hfcompress.formats.int_group.layer as layer_module

    layer = _layer(4, 32, False, False, 64, 96)
    x = torch.randn(2, 3, 96)
    through_op = torch.ops.hfcompress.int_group_mm(*_args(layer, x))
    with torch.no_grad():
        assert layer_module._plain_cpu_inference(x, layer.bias)
        assert torch.equal(layer(x), through_op)
    # a trainable bias or input: the op (with its autograd formula) runs, and gradients flow
    xg = x.clone().requires_grad_()
    assert not layer_module._plain_cpu_inference(xg, layer.bias)
    layer(xg).sum().backward()
    w = int_group_mm_ref(*_args(layer, torch.eye(96)))  # rows: W^T plus the bias
    expected = (w - layer.bias).sum(-1).expand(2, 3, 96)
    torch.testing.assert_close(xg.grad, expected, rtol=1e-4, atol=1e-4)
    # a declined layer: the reference, once per call (the backend is asked once, not twice)
    calls = []
    declined = _layer(4, 32, False, False, 64, 200)
    from hfcompress.formats.int_group.op import BACKENDS

    saved = BACKENDS.impls.get("cpu")
    BACKENDS.register("cpu", lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            y = declined(torch.randn(1, 200))
    finally:
        BACKENDS.register("cpu", saved)
    assert calls == [1] and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(4, 32, False, False, 70, 96), (4, 64, True, False, 64, 576),
                                  (4, -1, False, False, 40, 160), (4, 128, False, False, 48, 320),
                                  (4, 64, False, True, 64, 192), (4, 32, True, True, 48, 96)], ids=_id)
def test_kernels_cpu_prefill_rows_take_the_dense_path(case, dtype):
    """Many rows (prefill): 4-bit layers (act-order too) unpack their bf16 weight from the stored
    words and run a dense matmul; same tolerance against the reference as the int4 op."""
    import hfcompress.kernels.cpu as cpu

    layer = _layer(*case)
    x = torch.randn(2, cpu.DENSE_MIN_ROWS // 2 + 3, case[-1]).to(dtype)  # rows counted over the batch too
    prep = cpu._prepared(*_args(layer, x)[1:5], *_args(layer, x)[6:])
    ragged = case[1] != -1 and case[-1] % case[1]
    assert (prep[-1] is None) == bool(ragged)  # a ragged last group keeps the int4 op at any size
    y = int_group_mm_cpu(*_args(layer, x))
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], case[4])
    ref = int_group_mm_ref(*_args(layer, x.float()))
    assert sqnr_db(ref, y.float()) >= CPU_MIN_SQNR_DB
    if not ragged:  # the unpacked weight is the dequantized weight, rounded once to bf16
        w = cpu._dense_bf16(layer.weight, prep[-1], case[-1])
        expected = layer.dequantize(torch.float32)
        if prep[4] is not None:  # act-order: columns in group order, as the activations are permuted
            expected = expected[:, prep[4]]
        torch.testing.assert_close(w, expected.bfloat16(), rtol=0, atol=0)
        few = x[:, :3]  # few rows: the int4 op, a different kernel with the same numbers up to rounding
        assert sqnr_db(int_group_mm_ref(*_args(layer, few.float())), int_group_mm_cpu(*_args(layer, few)).float()) \
            >= CPU_MIN_SQNR_DB
