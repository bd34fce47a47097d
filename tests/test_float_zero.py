"""int_group with float zero points (``zero_point="float"``): spec and config errors, the grids
that fill them (RTN, GPTQ), save/reload, the reference vs the CPU fast path vs the GPU layout
vs the Triton interpreter, and the exporter that cannot hold them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from interpreter import run_interpreter_worker
from tiny_models import inputs, llama_gqa, sqnr_db
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import ConfigError, FormatError, GPTQConfig, QuantLinear, RTNConfig
from hfcompress.algorithms import grid as G
from hfcompress.formats.int_group import IntGroupSpec, dequantize, pack
from hfcompress.ops import int_group_mm_ref, set_cpu_fast_path


def _layer(bits, gs, act, n, k, seed=0):
    """A QuantLinear with random codes, scales and float zeros (some negative, some past maxq)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs == -1 else -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    zero = G.round_zero(torch.rand(n, n_groups, generator=g) * ((1 << bits) + 2) - 1, bits)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)] if act else None
    spec = IntGroupSpec(bits=bits, group_size=gs, act_order=act, zero_point="float")
    layer = QuantLinear.from_codes(codes, scale, zero, g_idx, spec, bias=torch.randn(n, generator=g))
    return layer, codes, scale, zero, g_idx


def test_float_zero_spec_tensors_and_bits():
    spec = IntGroupSpec(bits=4, group_size=64, zero_point="float")
    t = spec.tensor_shapes(96, 128)
    assert t["weight_zero"] == ((2, 96), torch.float16)
    # 4 bits + fp16 scale + fp16 zero per 64 weights = 4.5; integer zeros: 4 + 16/64 + 4/64
    assert spec.bits_per_weight(96, 128) == pytest.approx(4.5)
    assert IntGroupSpec(bits=4, group_size=64).bits_per_weight(96, 128) == pytest.approx(4 + 20 / 64)
    assert "zero_point" not in IntGroupSpec(bits=4).to_dict()
    assert spec.to_dict()["zero_point"] == "float"


def test_float_zero_spec_and_config_errors():
    with pytest.raises(FormatError, match="zero_point='half'"):
        IntGroupSpec(zero_point="half")
    with pytest.raises(FormatError, match="zero_point='float' with sym=True"):
        IntGroupSpec(sym=True, zero_point="float")
    with pytest.raises(ConfigError, match="zero_point"):
        RTNConfig(bits=4, sym=True, zero_point="float")
    with pytest.raises(ConfigError, match="quantization_config.zero_point must be str"):
        RTNConfig(zero_point=1)
    with pytest.raises(ConfigError, match="spqr format stores no float zero points"):
        hfcompress.SpQRConfig(zero_point="float")
    assert "zero_point" not in RTNConfig(zero_point="int").to_dict()  # integer-zero configs are written as before
    assert RTNConfig(zero_point="float").to_dict()["zero_point"] == "float"


def test_float_zero_and_static_groups_are_the_defaults():
    """Asymmetric GPTQ and RTN default to float zeros (GPTQ also to static groups: no g_idx);
    symmetric grids, formats without float zeros and explicit ``zero_point="int"`` store integers."""
    g = GPTQConfig(bits=4, group_size=64)
    assert (g.zero_point, g.static_groups, g.act_order) == ("float", True, True)
    assert g.spec == IntGroupSpec(bits=4, group_size=64, act_order=False, zero_point="float")
    assert g.to_dict()["zero_point"] == "float" and g.to_dict()["static_groups"] is True
    assert RTNConfig().zero_point == "float" and RTNConfig().spec.zero_point == "float"
    assert GPTQConfig(sym=True).zero_point == RTNConfig(sym=True).zero_point == "int"
    assert GPTQConfig(zero_point="int").spec.zero_point == RTNConfig(zero_point="int").spec.zero_point == "int"
    assert GPTQConfig(static_groups=False).spec.act_order is True  # g_idx groups on request
    assert hfcompress.SpQRConfig().zero_point == "int"  # its format has no float zeros
    # a round trip keeps what was chosen, either way
    for cfg in (g, RTNConfig(), GPTQConfig(zero_point="int"), RTNConfig(zero_point="int")):
        assert hfcompress.HfCompressConfig.from_dict(cfg.to_dict()).zero_point == cfg.zero_point


def test_module_table_entry_with_integer_zeros_in_a_float_zero_config_round_trips():
    name = "model.layers.0.mlp.down_proj"
    cfg = RTNConfig(bits=4, group_size=32, module_formats={name: {"bits": 8, "zero_point": "int"}})
    assert cfg.zero_point == "float" and cfg.spec_for(name).zero_point == "int"
    back = hfcompress.HfCompressConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.spec_for(name) == cfg.spec_for(name) and back.spec.zero_point == "float"


# quantization_config of a GPTQ and an RTN checkpoint written before zero_point existed (verbatim field sets)
_OLD_GPTQ = {"quant_method": "hfcompress", "format": "int_group", "format_version": 1, "algorithm": "gptq", "bits": 4,
             "group_size": 64, "sym": False, "act_order": True, "modules_to_not_convert": ["lm_head"],
             "static_groups": False, "damp": 0.01, "mse_clip": True, "dataset": None, "n_samples": 128,
             "seq_len": 512, "true_sequential": True}
_OLD_RTN = {"quant_method": "hfcompress", "format": "int_group", "format_version": 1, "algorithm": "rtn", "bits": 4,
            "group_size": 128, "sym": False, "act_order": False, "modules_to_not_convert": ["lm_head"],
            "mse_clip": False}


@pytest.mark.parametrize("old", [_OLD_GPTQ, _OLD_RTN], ids=["gptq", "rtn"])
def test_config_without_zero_point_loads_as_integer_zeros(old):
    cfg = hfcompress.HfCompressConfig.from_dict(dict(old))
    assert cfg.zero_point == "int" and cfg.spec.zero_point == "int"
    assert cfg.spec.act_order is (old["algorithm"] == "gptq")  # the old GPTQ stored g_idx
    assert cfg.to_dict() == old  # and it is written back unchanged


def test_float_zero_dequantize_is_the_formula():
    layer, codes, scale, zero, g_idx = _layer(4, 32, True, 40, 96)
    gi = g_idx.long()
    want = (codes.float() - zero[:, gi]) * scale.half().float()[:, gi]
    assert torch.equal(layer.dequantize(), want)
    assert layer.weight_zero.dtype == torch.float16 and layer.weight_zero.shape == (3, 40)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float_grids_never_worse_than_their_candidates(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g)
    w[:, 5] += 3 * torch.randn(300, generator=g)  # outliers

    def err(s, z, imp=None):
        r = (G.quantize_to_codes_float_zero(w, s, z, bits) - z[:, None]) * s[:, None] - w
        return (r.square() * (1 if imp is None else imp)).sum(1)

    e_minmax = err(*G.minmax_float_grid(w, bits))
    s, z = G.hqq_float_grid(w, bits, p=2.0)  # a row keeps its best iterate (the start included)
    start = G.minmax_float_grid(w, bits)[1].round()
    assert (err(s, z) <= err(G.minmax_float_grid(w, bits)[0], start) + 1e-9).all()
    s, z = G.search_float_grid(w, bits)
    assert (err(s, z) <= e_minmax + 1e-9).all()
    assert err(s, z).sum() < 0.97 * e_minmax.sum()
    # weighted, with an integer-zero candidate (GPTQ's use): never above that candidate's weighted error
    imp = torch.rand(64, generator=g)[None, :] + 0.1
    si, zi = G.search_grid(w, bits, importance=imp)
    s, z = G.search_float_grid(w, bits, importance=imp, start="hqq", extra=[(si, zi)])
    assert (err(s, z, imp) <= err(si, zi, imp) * (1 + 1e-6)).all()
    # stored values: fp16 scales and zeros, tiny zeros flushed to 0
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())
    assert not ((z != 0) & (z.abs() < G.zero_flush(bits))).any()


def _hqq_plain(w, bits, mask=None, p=0.7, beta=10.0, iters=20, round_start=True, stop="row", importance=None):
    """HQQ's half-quadratic loop as the paper writes it: every step recomputes the codes, the
    residual and (separately) the error of its new zero; never stops early unless hqq's tensor rule."""
    maxq = (1 << bits) - 1
    scale, zero = G.minmax_float_grid(w, bits, mask)
    if round_start:
        zero = G.round_zero(zero.round(), bits)
    d = G._entry_weights(w, importance, mask)
    best_z, best_e = zero.clone(), G._float_grid_error(w, scale, zero, bits, d, p)
    s, tensor_e = scale[:, None], float("inf")
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s + zero[:, None]), 0, maxq)
        r = w - (q - zero[:, None]) * s
        a = r.abs()
        e = torch.sign(r) * (a - a.pow(p - 1) / beta).clamp(min=0)
        t = q - (w - e) / s
        zero = G.round_zero(t.mean(1) if d is None else (t * d).sum(1) / d.sum(1), bits)
        if stop == "tensor":
            e_t = float(r.abs().mean()) if d is None else float((r.abs() * d).sum() / d.sum())
            if e_t >= tensor_e:
                break
            tensor_e, best_z = e_t, zero
            continue
        err = G._float_grid_error(w, scale, zero, bits, d, p)
        best_e, best_z = torch.where(err < best_e, err, best_e), torch.where(err < best_e, zero, best_z)
    return scale, best_z


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_float_grid_fused_loop_equals_the_plain_loop_bit_for_bit(bits):
    # the solver reuses each step's codes and residual for its error and the next step, divides
    # w / s once and stops at a fixed point: the same grids as the plain loop, bit for bit
    g = torch.Generator().manual_seed(10 + bits)
    w = torch.randn(257, 64, generator=g) * torch.rand(257, 1, generator=g)
    w[:, 3] += 2 * torch.randn(257, generator=g)  # outliers
    w[7] = 0.0  # a constant row
    imp = torch.rand(64, generator=g)[None, :] * 3 + 0.1
    mask = torch.rand(257, 64, generator=g) > 0.1
    for kw in ({}, {"importance": imp}, {"mask": mask, "p": 2.0}, {"stop": "tensor", "round_start": False},
               {"stop": "tensor", "importance": imp, "mask": mask, "iters": 50}, {"iters": 60}, {"p": 1.0, "beta": 1.0}):
        s, z = G.hqq_float_grid(w, bits, **kw)
        s0, z0 = _hqq_plain(w, bits, **kw)
        assert torch.equal(s, s0) and torch.equal(z, z0), kw
    # the loop moves zeros (the test compares more than the start)
    assert not torch.equal(G.hqq_float_grid(w, bits)[1], G.round_zero(G.minmax_float_grid(w, bits)[1].round(), bits))


def test_float_grid_refinds_a_q4_1_lattice():
    """Weights that are ``d * q + m`` per group (a dequantized Q4_1 GGUF): a float zero puts the
    grid on them (up to fp16 rounding of the scale); an integer zero cannot."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (256, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # every level range is used
    d = torch.rand(256, 1, generator=g) * 0.01 + 0.002
    m = -torch.rand(256, 1, generator=g) * 0.05
    w = d.half().float() * q + m
    s, z = G.minmax_float_grid(w, 4)
    wq = (G.quantize_to_codes_float_zero(w, s, z, 4) - z[:, None]) * s[:, None]
    si, zi = G.fit_grid(w, 4, sym=False)
    wi = (G.quantize_to_codes(w, si, zi, 4) - zi[:, None]) * si[:, None]
    rel = lambda a: ((a - w).square().sum() / w.square().sum()).item()  # noqa: E731
    assert rel(wq) < 1e-5 < 1e-3 < rel(wi)


def test_rtn_float_zero_save_reload_bit_exact(tmp_path):
    src = tmp_path / "src"
    llama_gqa().save_pretrained(src)
    cfg = RTNConfig(bits=4, group_size=32, zero_point="float")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.spec.zero_point == "float"
    assert layer.weight_zero.dtype == torch.float16
    x = inputs()
    with torch.no_grad():
        y = model(x).logits
    model.save_pretrained(tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        assert json.load(f)["quantization_config"]["zero_point"] == "float"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(back(x).logits, y)
    # against the float model: float zeros (HQQ's zero) closer than integer min-max (17.9 vs 17.1 dB, seeded)
    ref = AutoModelForCausalLM.from_pretrained(src)
    intq = AutoModelForCausalLM.from_pretrained(src, quantization_config=RTNConfig(bits=4, group_size=32,
                                                                                  zero_point="int"))
    with torch.no_grad():
        y_ref, y_int = ref(x).logits, intq(x).logits
    assert sqnr_db(y_ref, y) > sqnr_db(y_ref, y_int) > 15.0


def test_rtn_integer_zero_config_json_unchanged_and_reloads_as_integers(tmp_path):
    """An integer-zero checkpoint's config.json has no zero_point (as every checkpoint before the
    field had): a plain reload rebuilds integer zeros, not the float default."""
    llama_gqa().save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=RTNConfig(
        bits=4, group_size=32, zero_point="int"))
    model.save_pretrained(tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        assert "zero_point" not in json.load(f)["quantization_config"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    layer = back.model.layers[0].mlp.down_proj
    assert layer.spec.zero_point == "int" and layer.weight_zero.dtype == torch.int32
    with torch.no_grad():
        assert torch.equal(back(inputs()).logits, model(inputs()).logits)


def test_gptq_float_zero_layer_matches_its_codes():
    from hfcompress.algorithms.gptq import gptq

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(512, 128, generator=g) * (torch.rand(128, generator=g) * 2)
    H = 2 * x.t() @ x / x.shape[0]
    spec = IntGroupSpec(bits=4, group_size=32, act_order=True, zero_point="float")
    codes, scale, zero, g_idx = gptq(w, H, spec, mse_clip=True)
    assert zero.dtype == torch.float32 and torch.equal(zero, zero.half().float())
    assert zero.min() < zero.max() and not torch.equal(zero, zero.round())  # really float zeros
    layer = QuantLinear.from_codes(codes, scale, zero, g_idx, spec)
    gi = g_idx.long()
    assert torch.equal(layer.dequantize(), (codes.float() - zero[:, gi]) * scale[:, gi])
    # output error on the calibration inputs: close to the integer-zero GPTQ's (same objective)
    int_spec = IntGroupSpec(bits=4, group_size=32, act_order=True)
    ci, si, zi, gii = gptq(w, H, int_spec, mse_clip=True)
    wi = QuantLinear.from_codes(ci, si, zi, gii, int_spec).dequantize()
    out_err = lambda wq: ((wq - w) @ x.t()).square().sum().item()  # noqa: E731
    assert out_err(layer.dequantize()) < 1.05 * out_err(wi)


@pytest.mark.parametrize("case", [(4, 32, False, 64, 96), (4, 64, True, 64, 192), (3, 32, False, 70, 96),
                                  (2, 128, False, 48, 256), (8, -1, False, 64, 96)], ids=str)
@pytest.mark.parametrize("m", [3, 300])  # the int4 / int8 op, and the dense bf16 path of prefill (4-bit)
def test_float_zero_cpu_fast_path_matches_reference(case, m):
    bits, gs, act, n, k = case
    layer, *_ = _layer(bits, gs, act, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    args = (x, layer.weight, layer.weight_scale, layer.weight_zero, layer.weight_g_idx, layer.bias,
            bits, gs, False, k)
    from hfcompress.kernels.cpu import int_group_mm_cpu

    previous = set_cpu_fast_path("auto")
    try:
        y = int_group_mm_cpu(*args)
    finally:
        set_cpu_fast_path(previous)
    assert y is not None, "the fast path declined a float-zero layer"
    assert sqnr_db(int_group_mm_ref(*args), y) > 40.0


@pytest.mark.parametrize("case", [(4, 32, False), (4, 40, True), (3, 64, False), (2, 64, True), (8, 32, False)],
                         ids=str)
def test_float_zero_gpu_layout_is_the_reference_bit_for_bit(case):
    from hfcompress.kernels.gpu_layout import build_layout, dequantize_layout

    bits, gs, act = case
    layer, *_ = _layer(bits, gs, act, 70, 200)
    lay = build_layout(layer.weight, layer.weight_scale, layer.weight_zero, layer.weight_g_idx, bits, gs, False, 200)
    assert torch.equal(dequantize_layout(lay), layer.dequantize(torch.float32))


def _interpret_worker() -> None:  # runs in a subprocess with TRITON_INTERPRET=1
    from hfcompress.kernels.configs import KernelConfig
    from hfcompress.kernels.int_group_mm import int_group_mm_triton

    results = {}
    cases = [(4, 1, 32, False, None), (4, 33, 40, True, None), (3, 2, 64, False, None), (2, 70, 64, True, None),
             (8, 16, 32, False, None), (4, 20, 64, False, dict(kind="dense", block_n=32))]
    for i, (bits, m, gs, act, cfg) in enumerate(cases):
        layer, *_ = _layer(bits, gs, act, 70, 200, seed=i)
        x = torch.randn(m, 200, generator=torch.Generator().manual_seed(i))
        args = (x, layer.weight, layer.weight_scale, layer.weight_zero, layer.weight_g_idx, layer.bias,
                bits, gs, False, 200)
        y = int_group_mm_triton(*args, config=KernelConfig(**cfg) if cfg else None)
        results[f"{bits}-{m}-{gs}-{act}"] = sqnr_db(int_group_mm_ref(*args), y)
    print("RESULTS " + json.dumps(results))


def test_float_zero_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    results = run_interpreter_worker("test_float_zero", "_interpret_worker()")
    assert len(results) == 6 and all(v > 100.0 for v in results.values()), results


def test_float_zero_checkpoint_export_refused(tmp_path):
    from hfcompress.convert.int_group_to_compressed_tensors import ConversionError, export_compressed_tensors

    llama_gqa().save_pretrained(tmp_path / "src")
    AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=RTNConfig(
        bits=4, group_size=32, zero_point="float")).save_pretrained(tmp_path / "q")
    with pytest.raises(ConversionError, match=r"zero_point='float'.*weight_zero \[groups, out_features\]"):
        export_compressed_tensors(str(tmp_path / "q"), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_float_zero_tampered_zero_named(tmp_path):
    from safetensors.torch import load_file, save_file

    llama_gqa().save_pretrained(tmp_path / "src")
    AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=RTNConfig(
        bits=4, group_size=32, zero_point="float")).save_pretrained(tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.self_attn.o_proj.weight_zero"
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(Exception, match="o_proj.weight_zero"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_float_zero_cli_quantize_then_inspect(tmp_path, capsys):
    from hfcompress.cli.main import main

    llama_gqa().save_pretrained(tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), "--method", "rtn", "--group-size", "32", "--zero-point", "float",
                 "--out", str(tmp_path / "q")]) == 0
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    expect = hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(tmp_path / "f"),
                                  RTNConfig(bits=4, group_size=32, zero_point="float"))
    with torch.no_grad():
        assert torch.equal(q(inputs()).logits, expect(inputs()).logits)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "zero_point: float" in out
    bpw = IntGroupSpec(bits=4, group_size=32, zero_point="float").bits_per_weight(96, 96)
    assert bpw == pytest.approx(5.0)
    line = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.self_attn.q_proj"))
    assert line.split()[1:] == ["96", "96", f"{bpw:.3f}"]


def test_gptq_float_zero_end_to_end_save_reload(tmp_path):
    cfg = GPTQConfig(bits=4, group_size=32, zero_point="float", static_groups=False, dataset=inputs(8, 40),
                     n_samples=8, seq_len=32)
    assert cfg.spec.zero_point == "float" and cfg.spec.act_order  # float zeros with g_idx groups
    model = hfcompress.quantize_(llama_gqa(), cfg)
    layer = model.model.layers[1].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.weight_zero.dtype == torch.float16
    assert not torch.equal(layer.weight_zero, layer.weight_zero.round())
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(inputs()).logits, model(inputs()).logits)
    assert GPTQConfig(static_groups=True, zero_point="float").spec.zero_point == "float"
