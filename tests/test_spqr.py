"""SpQR: the algorithm's invariants, the spqr format (reference, packing, validation), its fast
paths against the reference, and the whole path on tiny models (quantize, save/reload
bit-exact, streaming, CLI, inspect/card bits, EoRA and LoRA on top)."""

from __future__ import annotations

import json

import pytest
import torch

import hfcompress
from hfcompress.algorithms.spqr import (fit_stored_grid, leave_one_out_reduction, minmax_grid, prepare_hessian,
                                       quantize_stats, spqr)
from hfcompress.formats import FormatError
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec, spqr_mm_ref
from hfcompress.formats.spqr.cpu import spqr_mm_cpu
from hfcompress.formats.spqr.reference import dequantize_stored, first_level_scales
from interpreter import run_interpreter_worker
from tiny_models import inputs, llama_gqa, qwen2, sqnr_db


def _problem(n=48, k=96, seed=0, planted=((3, 85, 9.0), (40, 70, -7.0))):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    for r, c, v in planted:
        w[r % n, c % k] = v * 0.1
    x = torch.randn(256, k, generator=g) * torch.linspace(0.3, 2.0, k)  # uneven input energy
    return w, x, x.t() @ x / x.shape[0]


def _layer(w, H, tau=float("inf"), spec=SpQRSpec(), bias=None):
    hs = prepare_hessian(H, 0.01, spec.act_order)
    r = spqr(w, hs, spec.bits, spec.group_size, spec.stat_bits, spec.stat_group_size, tau)
    return SpQRLinear.from_codes(r, spec, bias=bias)


def _out_err(layer, w, x):
    return float(((layer.dequantize() - w) @ x.t()).square().sum() / (w @ x.t()).square().sum())


def test_spqr_beats_rounding_on_its_own_grid_and_outliers_help():
    w, x, H = _problem()
    rtn = SpQRLinear.from_float(w, None, SpQRSpec(act_order=False))        # identity Hessian: plain rounding
    plain = _layer(w, H)                                                    # Hessian-aware, no outliers
    with_out = _layer(w, H, tau=1.0)
    assert _out_err(plain, w, x) < 0.8 * _out_err(rtn, w, x)
    assert with_out.n_outliers > 0 and plain.n_outliers == 0
    assert _out_err(with_out, w, x) < _out_err(plain, w, x)
    # the planted weights (in high-energy input columns) are among the outliers (row, input column)
    t = with_out.stored_tensors()
    rows = torch.repeat_interleave(torch.arange(48), (t["weight_outlier_ptr"][1:] - t["weight_outlier_ptr"][:-1]).long())
    cols = t["weight_perm"].long()[t["weight_outlier_col"].long()]
    kept = set(zip(rows.tolist(), cols.tolist()))
    assert {(3, 85), (40, 70)} <= kept and len(kept) < 0.05 * w.numel()


def test_leave_one_out_finds_the_weight_that_stretches_the_grid():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, generator=g)
    w[2, 11] = 25.0
    red = leave_one_out_reduction(w, torch.ones(16), bits=3)
    assert red.shape == (4, 16) and int(red[2].argmax()) == 11
    assert float(red[2, 11]) > 3 * float(red[2].sort().values[-2])
    assert float(red[2, 11]) > 3 * float(red[[0, 1, 3]].max())


def test_second_level_statistics_are_stat_bit_codes_with_fp16_scale_and_zero():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(70, generator=g) * 0.05 + 0.01
    codes, ss, sz, used = quantize_stats(s, stat_bits=3, stat_group_size=16)
    assert codes.shape == (70,) and int(codes.max()) <= 7 and ss.shape == sz.shape == (5,)
    assert ss.dtype == sz.dtype == torch.float16
    which = torch.arange(70) // 16
    assert torch.equal(used, ((codes - sz.float()[which]) * ss.float()[which]).half().float())
    assert float((used - s).abs().max()) <= float(ss.float().max()) * 0.51 + 1e-4  # half a stat step
    d = torch.arange(8)[:, None] - sz.float()  # every code - zero is an fp16 number: fp16 math rebuilds `used`
    assert torch.equal(d.half().float(), d)


@pytest.mark.parametrize("seed", range(4))
def test_stored_grid_is_never_worse_than_min_max_on_the_same_statistics(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 16, generator=g) * torch.rand(64, 1, generator=g)   # rows of different ranges
    d = torch.rand(16, generator=g) + 0.5                                    # Hessian weights 1 / d^2
    s1, z1 = minmax_grid(w, 3)
    sc, ss, sz, scale = quantize_stats(s1, 3, 16)

    def err(scale, zero):
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 7)
        return (((q - zero[:, None]) * scale[:, None] - w) / d).square().sum(1)

    c, z, s = fit_stored_grid(w, d, sc, ss, sz, 3, 3, 16)
    which = torch.arange(64) // 16
    assert torch.equal(s, ((c - sz.float()[which]) * ss.float()[which]).half().float())  # a storable scale
    assert bool((err(s, z) <= err(scale, z1) + 1e-7).all())                             # row by row
    assert float(err(s, z).sum()) < 0.97 * float(err(scale, z1).sum())                  # and better in total


def test_grid_options_unclipped_and_unweighted():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 16, generator=g) * torch.rand(64, 1, generator=g)
    w[5, 3] = 4.0                                                            # a weight MSE-optimal grids clip
    d = torch.rand(16, generator=g) + 0.5
    s1, _ = minmax_grid(w, 3)
    sc, ss, sz, _ = quantize_stats(s1, 3, 16)
    c, z, s = fit_stored_grid(w, d, sc, ss, sz, 3, 3, 16)
    cn, zn, sn = fit_stored_grid(w, d, sc, ss, sz, 3, 3, 16, clip=False)
    r = torch.round(w / s[:, None]) + z[:, None]
    rn = torch.round(w / sn[:, None]) + zn[:, None]
    assert bool(((r < 0) | (r > 7)).any())                                   # the default clips some rows
    assert bool(((rn >= 0) & (rn <= 7)).all())                              # clip=False: every weight on the grid
    # grid_weighting="uniform": the same algorithm with every column weighted alike (d = 1 for the grid fits)
    w2, x2, H2 = _problem(seed=8)
    hs = prepare_hessian(H2, 0.01, True)
    a = spqr(w2, hs, outlier_threshold=1.0)
    b = spqr(w2, hs, outlier_threshold=1.0, grid_weighting="uniform")
    assert not torch.equal(a.scale_code, b.scale_code) and torch.equal(a.perm, b.perm)


def test_reference_follows_the_documented_formula():
    from hfcompress.formats.int_group import unpack_codes

    w, x, H = _problem(seed=3)
    layer = _layer(w, H, tau=1.0)
    t = layer.stored_tensors()
    n, k = w.shape
    c = unpack_codes(t["weight_scale_code"], 3, n).float()                      # [G, N]
    sg = torch.arange(n) // 16
    s = ((c - t["weight_scale_zero"].float()[:, sg]) * t["weight_scale_scale"].float()[:, sg]).half().float()
    z = unpack_codes(t["weight_zero"], 3, n).float()                             # [G, N]
    q = unpack_codes(t["weight"], 3, k).float()                                  # [N, K]
    grp = torch.arange(k) // 16
    dense = (q - z.t()[:, grp]) * s.t()[:, grp]
    rows = torch.repeat_interleave(torch.arange(n), (t["weight_outlier_ptr"][1:] - t["weight_outlier_ptr"][:-1]).long())
    dense[rows, t["weight_outlier_col"].long()] += t["weight_outlier_val"].float()
    expected = torch.empty_like(dense)
    expected[:, t["weight_perm"].long()] = dense
    assert layer.n_outliers > 0 and torch.equal(layer.dequantize(), expected)
    assert torch.equal(first_level_scales(t["weight_scale_code"], t["weight_scale_scale"], t["weight_scale_zero"], 3,
                                          16, n), s.t().half())
    assert t["weight_perm"].dtype == torch.int16 and t["weight_outlier_col"].dtype == torch.int16
    names = ("weight", "weight_zero", "weight_scale_code", "weight_scale_scale", "weight_scale_zero",
             "weight_outlier_ptr", "weight_outlier_col", "weight_outlier_val")
    assert torch.equal(dequantize_stored(*(t[n_] for n_ in names), layer.spec, k), dense)


def test_bits_per_weight_counts_everything():
    spec = SpQRSpec()
    n, k, nnz = 1536, 576, 900
    expected = (3 * n * k + 3 * n * k / 16 + 3 * n * k / 16 + 2 * 16 * (k // 16) * (n // 16) + 16 * k + 32 * (n + 1)
                + (16 + 16) * nnz) / (n * k)
    assert spec.bits_per_weight(n, k, nnz) == pytest.approx(expected)


@pytest.mark.parametrize("bad,match", [
    (dict(bits=5), "bits=5 is not supported by spqr"),
    (dict(group_size=12), "group_size=12 must be an int >= 2 and a multiple of 8"),
    (dict(stat_bits=1), "stat_bits=1 is not supported"),
])
def test_spec_errors_name_the_field(bad, match):
    with pytest.raises(FormatError, match=match):
        SpQRSpec(**bad)


def test_config_fields_roundtrip_and_errors():
    cfg = hfcompress.SpQRConfig(outlier_threshold=0.5, stat_group_size=32)
    d = cfg.to_dict()
    assert d["format"] == "spqr" and d["algorithm"] == "spqr" and d["stat_group_size"] == 32
    again = hfcompress.HfCompressConfig.from_dict(json.loads(json.dumps(d)))
    assert isinstance(again, hfcompress.SpQRConfig) and again.spec == cfg.spec and again.outlier_threshold == 0.5
    assert hfcompress.SpQRConfig(outlier_threshold=None).to_dict()["outlier_threshold"] is None
    with pytest.raises(hfcompress.ConfigError, match="quantization_config.sym=True"):
        hfcompress.SpQRConfig(sym=True)
    with pytest.raises(hfcompress.ConfigError, match="quantization_config.outlier_threshold=-1"):
        hfcompress.SpQRConfig(outlier_threshold=-1)
    with pytest.raises(hfcompress.ConfigError, match="quantization_config: bits=8 is not supported by spqr"):
        hfcompress.SpQRConfig(bits=8)
    with pytest.raises(hfcompress.ConfigError, match="quantization_config.stat_bits must be int"):
        hfcompress.SpQRConfig(stat_bits="3")


def test_layer_that_cannot_be_tiled_names_the_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=152, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()  # 152 % 16 != 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: in_features=152 is not a multiple "
                                         r"of group_size=16"):
        hfcompress.quantize_(model, hfcompress.SpQRConfig(), batches=[inputs(1, 8)])


@pytest.mark.parametrize("gs,act,tau,n", [(16, True, 1.0, 48), (16, False, float("inf"), 40), (32, True, 0.5, 50)])
def test_cpu_fast_path_matches_reference(gs, act, tau, n):
    w, x, H = _problem(n=n, k=128, seed=4)
    layer = _layer(w, H, tau=tau, spec=SpQRSpec(group_size=gs, act_order=act), bias=torch.randn(n))
    args = (*layer._stored_args(), layer.bias, 3, gs, 3, 16, 128)
    for m in (1, 5):
        xs = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
        ref = spqr_mm_ref(xs, *args)
        for dtype, min_db in ((torch.float32, 40.0), (torch.bfloat16, 35.0)):
            y = spqr_mm_cpu(xs.to(dtype), *args)
            assert y is not None and y.dtype == dtype and y.shape == (m, n)
            assert sqnr_db(ref, y.float()) > min_db


def test_op_opcheck_and_autograd():
    w, x, H = _problem(n=32, k=64, seed=5)
    layer = _layer(w, H, tau=1.0, bias=torch.randn(32))
    xs = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.hfcompress.spqr_mm.default,
                          (xs, *layer._stored_args(), layer.bias, 3, 16, 3, 16, 64))
    y = layer(xs)
    y.sum().backward()
    assert torch.allclose(xs.grad, layer.dequantize().sum(0).expand(3, 64), atol=1e-5)


def test_inference_skips_the_dispatcher_only_where_nothing_watches():
    from torch.utils._python_dispatch import TorchDispatchMode

    from hfcompress.formats.spqr.op import is_plain_cpu_inference, spqr_mm

    w, x, H = _problem(n=32, k=64, seed=6)
    layer = _layer(w, H, tau=1.0, bias=torch.randn(32))
    xs = torch.randn(3, 64)
    args = (*layer._stored_args(), layer.bias, 3, 16, 3, 16, 64)
    with torch.no_grad():
        assert is_plain_cpu_inference(xs, layer.bias)
        assert torch.equal(layer(xs), spqr_mm(xs, *args))                   # same numbers as the op
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        assert not is_plain_cpu_inference(xs)
        layer(xs)
    assert any("spqr_mm" in f for f in seen)                                 # a mode still sees the op
    assert not is_plain_cpu_inference(xs.requires_grad_())                   # training takes the op (autograd)
    assert not is_plain_cpu_inference(torch.empty(3, 64, device="meta"))


def _quantized_tiny(builder=llama_gqa, tau=1.0, **kw):
    model = builder(seed=3)
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(3)]
    return hfcompress.quantize_(model, hfcompress.SpQRConfig(outlier_threshold=tau, **kw), batches=batches), batches


@pytest.mark.parametrize("builder", [llama_gqa, qwen2], ids=["llama", "qwen2"])
def test_spqr_save_reload_bit_exact_and_bits_counted(builder, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _quantized_tiny(builder)
    ids = inputs()
    with torch.no_grad():
        out = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert layers and sum(m.n_outliers for m in layers) > 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, out)
    assert [m.n_outliers for m in reloaded.modules() if isinstance(m, SpQRLinear)] == [m.n_outliers for m in layers]
    expected = sum(m.spec.bits_per_weight(m.out_features, m.in_features, m.n_outliers) * m.out_features *
                   m.in_features for m in layers) / sum(m.out_features * m.in_features for m in layers)
    assert hfcompress.hub.size_stats(model).bits_per_weight == pytest.approx(expected)
    from hfcompress.inspect import format_summary, summarize

    s = summarize(str(tmp_path))
    assert len(s.layers) == len(layers) and s.quantized_bits_per_weight == pytest.approx(expected)
    assert "format: spqr v1" in format_summary(s)
    card = (tmp_path / "README.md").read_text()
    assert f"{expected:.3f}" in card


def test_tampered_outliers_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model, _ = _quantized_tiny()
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    t = load_file(f)
    key = "model.layers.0.self_attn.q_proj.weight_outlier_ptr"
    t[key] = t[key].flip(0).contiguous()
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight_outlier_ptr is not a CSR"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_streaming_writes_what_in_memory_quantization_saves(tmp_path):
    from safetensors.torch import load_file

    model = llama_gqa(seed=3)
    model.save_pretrained(tmp_path / "float")
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(3)]
    cfg = hfcompress.SpQRConfig(outlier_threshold=1.0)
    hfcompress.quantize(str(tmp_path / "float"), cfg, out_dir=str(tmp_path / "streamed"), batches=batches)
    mem, _ = _quantized_tiny()
    expected = {k: v for k, v in mem.state_dict().items() if "lm_head" not in k}
    got = {}
    for f in (tmp_path / "streamed").glob("*.safetensors"):
        got.update(load_file(f))
    assert set(expected) <= set(got)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_cli_quantize_spqr(tmp_path):
    import tiny_models as tm
    from hfcompress.cli.main import main

    llama_gqa(seed=3).save_pretrained(tmp_path / "float")
    tm.char_tokenizer().save_pretrained(tmp_path / "float")
    rc = main(["quantize", str(tmp_path / "float"), "--method", "spqr", "--outlier-threshold", "1.0",
               "--n-samples", "4", "--seq-len", "16", "--out", str(tmp_path / "q")])
    assert rc == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (cfg["format"], cfg["bits"], cfg["group_size"], cfg["outlier_threshold"]) == ("spqr", 3, 16, 1.0)


def test_eora_and_lora_on_top():
    from peft import LoraConfig, get_peft_model

    from hfcompress.adapters.eora import compressed_weight

    model, batches = _quantized_tiny()
    original = llama_gqa(seed=3)
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(compressed_weight(q), q.dequantize(torch.float32))
    ids = inputs()
    with torch.no_grad():
        ref, base = original(ids).logits, model(ids).logits
    peft_model = hfcompress.compensate(model, original, hfcompress.EoRAConfig(rank=8, dataset=torch.cat(batches)))
    with torch.no_grad():
        comp = peft_model(ids).logits
    assert float((comp - ref).norm()) < float((base - ref).norm())
    lora = get_peft_model(_quantized_tiny()[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    out = lora(ids).logits
    out.sum().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _interpret_worker() -> None:  # runs in a subprocess with TRITON_INTERPRET=1
    from hfcompress.formats.spqr.cuda import spqr_mm_cuda

    results = {}
    for gs, act, tau in ((16, True, 1.0), (32, False, float("inf"))):
        w, x, H = _problem(n=40, k=64, seed=6)
        layer = _layer(w, H, tau=tau, spec=SpQRSpec(group_size=gs, act_order=act), bias=torch.randn(40))
        args = (*layer._stored_args(), layer.bias, 3, gs, 3, 16, 64)
        for m in (1, 17):
            xs = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
            y = spqr_mm_cuda(xs, *args)
            results[f"g{gs}-m{m}"] = None if y is None else sqnr_db(spqr_mm_ref(xs, *args), y.float())
    print("RESULTS " + json.dumps(results))


def test_cuda_path_matches_reference_under_triton_interpreter():
    pytest.importorskip("triton")
    results = run_interpreter_worker("test_spqr", "_interpret_worker()")
    assert set(results) == {"g16-m1", "g16-m17", "g32-m1", "g32-m17"}
    for case, db in results.items():
        assert db is not None and db > 60.0, (case, db)


def test_spqr_on_load_with_from_pretrained(tmp_path):
    """``from_pretrained(..., quantization_config=SpQRConfig(...))`` calibrates after loading (with the
    checkpoint's own tokenizer) and writes what ``quantize_`` on the same tokens writes."""
    import tiny_models as tm
    from transformers import AutoModelForCausalLM

    llama_gqa(seed=3).save_pretrained(tmp_path / "float")
    tok = tm.char_tokenizer()
    tok.save_pretrained(tmp_path / "float")
    cfg = dict(n_samples=4, seq_len=16, outlier_threshold=1.0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfcompress.SpQRConfig(**cfg))
    mem = hfcompress.quantize_(llama_gqa(seed=3), hfcompress.SpQRConfig(**cfg), tokenizer=tok)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, SpQRLinear)
    a, b = loaded.state_dict(), mem.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
