"""int_group format: exact packing, the dequantize contract, spec validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.formats import FormatError, IntGroupSpec, dequantize, pack_codes, unpack_codes, validate_tensors
from hfcompress.formats.int_group import packed_len
from hfcompress.nn import QuantLinear


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), length=st.integers(1, 200), seed=st.integers(0, 10**6))
def test_pack_unpack_roundtrip_exact(bits, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, length), generator=g, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_len(length, bits))
    assert torch.equal(unpack_codes(packed, bits, length).long(), codes)


def test_pack_layout_is_little_endian_bitstream():
    # 4-bit: 8 codes per word, code j in bits [4j, 4j+4)
    codes = torch.arange(32).remainder(16).view(1, 32)
    words = pack_codes(codes, 4)[0].tolist()
    assert words[0] == int("76543210", 16)
    # 3-bit: code 10 straddles words 0 and 1 (bits 30..32)
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111
    w = pack_codes(codes, 3)[0].tolist()
    assert (w[0] & 0xFFFFFFFF) == 0b11 << 30 and w[1] == 0b1 and w[2] == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_the_bitstream_definition(bits):
    # each run of 32 codes is one little-endian integer of 32*bits bits (code i at bit i*bits),
    # cut into 32-bit words; checked against Python integers for every width (the whole-word
    # widths take a faster path than 3-bit)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 75), generator=g, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    for r in range(3):
        row = codes[r].tolist() + [0] * (96 - 75)
        expect = []
        for run in range(3):
            value = sum(c << (i * bits) for i, c in enumerate(row[32 * run:32 * run + 32]))
            expect += [(value >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]
        assert [w & 0xFFFFFFFF for w in packed[r].tolist()] == expect
    assert torch.equal(unpack_codes(packed, bits, 75).long(), codes)


def test_dequantize_matches_definition_with_ragged_groups_and_g_idx():
    torch.manual_seed(0)
    n, k, bits, gs = 6, 40, 3, 16  # groups of 16, 16, 8 (ragged)
    spec = IntGroupSpec(bits=bits, group_size=gs, sym=False, act_order=True)
    codes = torch.randint(0, 8, (n, k))
    scale = (torch.rand(n, 3) + 0.01).half().float()
    zero = torch.randint(0, 8, (n, 3))
    g_idx = torch.randperm(k) % 3  # arbitrary assignment, still in range
    layer = QuantLinear.from_codes(codes, scale, zero, g_idx, spec)
    expect = (codes.float() - zero.float()[:, g_idx]) * scale[:, g_idx]
    assert torch.equal(layer.dequantize(torch.float32), expect)
    sym = IntGroupSpec(bits=bits, group_size=gs, sym=True)
    layer = QuantLinear.from_codes(codes, scale, None, None, sym)
    gi = torch.arange(k) // gs
    assert torch.equal(layer.dequantize(torch.float32), (codes.float() - 4) * scale[:, gi])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantlinear_forward_uses_dequantized_weight(dtype):
    torch.manual_seed(0)
    spec = IntGroupSpec(bits=4, group_size=32)
    layer = QuantLinear.from_codes(torch.randint(0, 16, (24, 72)), torch.rand(24, 3) * 0.1,
                                   torch.randint(0, 16, (24, 3)), None, spec, bias=torch.randn(24),
                                   compute_dtype=dtype)
    x = torch.randn(3, 5, 72, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 24)
    expect = x @ layer.dequantize(dtype).t() + layer.bias
    assert torch.equal(y, expect)


def test_quantlinear_dtype_moves_keep_scales():
    g = torch.Generator().manual_seed(0)
    spec = IntGroupSpec(bits=4, group_size=32)
    scale = torch.rand(8, 2, generator=g) * 1e-3 + 1e-4
    codes, zero = torch.randint(0, 16, (8, 64), generator=g), torch.randint(0, 16, (8, 2), generator=g)
    layer = QuantLinear.from_codes(codes, scale, zero, None, spec, bias=torch.randn(8, generator=g))
    before = layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float16 and torch.equal(layer.weight_scale, before)
    assert layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == torch.int32


def test_custom_op_opcheck():
    g = torch.Generator().manual_seed(0)
    spec = IntGroupSpec(bits=4, group_size=32)
    layer = QuantLinear.from_codes(torch.randint(0, 16, (16, 64), generator=g), torch.rand(16, 2, generator=g) * 0.1,
                                   torch.randint(0, 16, (16, 2), generator=g), None, spec,
                                   bias=torch.randn(16, generator=g))
    x = torch.randn(3, 64, requires_grad=True, generator=g)
    args = (x, layer.weight, layer.weight_scale, layer.weight_zero, None, layer.bias, 4, 32, False, 64)
    torch.library.opcheck(torch.ops.hfcompress.int_group_mm.default, args)


def test_torch_compile_through_fake():
    g = torch.Generator().manual_seed(0)
    spec = IntGroupSpec(bits=4, group_size=32)
    layer = QuantLinear.from_codes(torch.randint(0, 16, (16, 64), generator=g), torch.rand(16, 2, generator=g) * 0.1,
                                   torch.randint(0, 16, (16, 2), generator=g), None, spec)
    x = torch.randn(2, 64, generator=g)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "bits=5"),
    ({"bits": 1}, "bits=1"),
    ({"group_size": 0}, "group_size=0"),
    ({"group_size": 33}, "group_size=33"),
    ({"group_size": 4}, "group_size=4"),
])
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(FormatError, match=match):
        IntGroupSpec(**kwargs)


def test_group_larger_than_layer_is_rejected_with_module_name():
    with pytest.raises(FormatError, match="model.layers.0.q_proj: group_size=128 is larger than in_features=64"):
        IntGroupSpec(group_size=128).check_layer(64, where="model.layers.0.q_proj")


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), act=st.booleans(),
       n=st.integers(1, 40), k=st.integers(8, 100), bad=st.sampled_from(["shape", "dtype", "missing", "g_idx", "none"]))
def test_validator_fuzz(bits, sym, act, n, k, bad):
    spec = IntGroupSpec(bits=bits, group_size=8, sym=sym, act_order=act)
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in spec.tensor_shapes(n, k).items()}
    if bad == "shape":
        tensors["weight"] = torch.zeros(n, tensors["weight"].shape[1] + 1, dtype=torch.int32)
    elif bad == "dtype":
        tensors["weight_scale"] = tensors["weight_scale"].float()
    elif bad == "missing":
        del tensors["weight_scale"]
    elif bad == "g_idx" and act:
        tensors["weight_g_idx"][-1] = spec.n_groups(k)
    if bad == "none" or (bad == "g_idx" and not act):
        validate_tensors(tensors, spec, n, k, where="m")
        return
    with pytest.raises(FormatError) as e:
        validate_tensors(tensors, spec, n, k, where="m")
    assert "m.weight" in str(e.value)


def test_bits_per_weight_counts_overhead():
    spec = IntGroupSpec(bits=4, group_size=64, sym=False)
    # 4 bits + 16-bit scale per 64 + 4-bit zero per 64 (N multiple of 32: no padding)
    assert spec.bits_per_weight(576, 576) == pytest.approx(4 + 16 / 64 + 4 / 64)
    assert IntGroupSpec(bits=3, group_size=-1, sym=True).bits_per_weight(64, 576) == pytest.approx(3 + 16 / 576)
    assert dequantize  # exported
