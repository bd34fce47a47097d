"""SpQR with per-layer bit widths (``module_formats``): each layer quantized on its own spec,
saved and reloaded bit-exact; a table naming another format is refused; the allocation proxy of
benchmarks/spqr_mixed.py rounds exactly as the format's own data-free path."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import hfcompress
from hfcompress.config import ConfigError
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
from tiny_models import inputs, llama_gqa

WIDE = "model.layers.0.mlp.down_proj"    # [96, 160]: 160 inputs = 5 groups of 32
TABLE = {WIDE: {"bits": 4, "group_size": 32, "act_order": False},
         "model.layers.1.self_attn.q_proj": {"group_size": 32}}


def _quantize(table, seed=3):
    model = llama_gqa(seed=seed)
    float_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(3)]
    cfg = hfcompress.SpQRConfig(outlier_threshold=None, stat_group_size=32, module_formats=table)
    return hfcompress.quantize_(model, cfg, batches=batches), float_w


def _rel_err(layer, w):
    return float((layer.dequantize() - w).square().sum() / w.square().sum())


def test_each_layer_takes_its_table_spec_and_four_bits_lower_its_error():
    mixed, w = _quantize(TABLE)
    uniform, _ = _quantize(None)
    specs = {n: m.spec for n, m in mixed.named_modules() if isinstance(m, SpQRLinear)}
    assert specs[WIDE] == SpQRSpec(bits=4, group_size=32, stat_group_size=32, act_order=False)
    assert specs["model.layers.1.self_attn.q_proj"] == SpQRSpec(group_size=32, stat_group_size=32)
    assert specs["model.layers.0.self_attn.q_proj"] == SpQRSpec(stat_group_size=32)  # the config's own
    wide_mixed, wide_uniform = mixed.get_submodule(WIDE), uniform.get_submodule(WIDE)
    assert wide_mixed.weight.shape == (96, 160 * 4 // 32)   # packed 4-bit codes along the 160 inputs
    # 4-bit codes: the layer's weight error well under the 3-bit layer's (random weights: ~4x)
    e4, e3 = _rel_err(wide_mixed, w[WIDE]), _rel_err(wide_uniform, w[WIDE])
    assert e4 < 0.35 * e3, (e4, e3)
    # the bits a 4-bit g32 layer stores, everything counted (no outliers)
    assert wide_mixed.spec.bits_per_weight(96, 160) == pytest.approx(4 + (4 + 3) / 32 + 32 / (32 * 32) + 32 * 97 / (96 * 160))
    # layers outside the table are quantized exactly as without one (same Hessians: earlier layers are the same)
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(mixed.get_submodule(first).dequantize(), uniform.get_submodule(first).dequantize())


def test_mixed_checkpoint_reloads_bit_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _quantize(TABLE)
    ids = inputs()
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["module_formats"][WIDE] == {"format": "spqr", "bits": 4, "group_size": 32, "stat_bits": 3,
                                         "stat_group_size": 32, "act_order": False}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.get_submodule(WIDE).spec.bits == 4
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, out)


def test_table_naming_another_format_is_refused():
    with pytest.raises(ConfigError, match=r"module_formats\['model\.layers\.0\.mlp\.down_proj'\]\.format='int_group'"):
        hfcompress.SpQRConfig(module_formats={WIDE: {"format": "int_group", "bits": 4, "group_size": 32}})
    with pytest.raises(ConfigError, match=r"module_formats\['model\.layers\.0\.mlp\.down_proj'\].*bits=5"):
        hfcompress.SpQRConfig(module_formats={WIDE: {"bits": 5}})


def test_allocation_proxy_rounds_as_the_formats_data_free_path():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        from spqr_mixed import stored_grid_rounding
    finally:
        sys.path.pop(0)
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    for fields in ({"bits": 3, "group_size": 16}, {"bits": 4, "group_size": 32}):
        spec = SpQRSpec(**fields, stat_group_size=32, act_order=False)
        expected = SpQRLinear.from_float(w, None, spec).dequantize()
        assert torch.equal(stored_grid_rounding(w, spec, torch.arange(96)), expected)


def _bench_module():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import spqr_mixed
    finally:
        sys.path.pop(0)
    return spqr_mixed


def test_spqr_proxy_scores_spqrs_own_output_error_with_its_outliers():
    """``--proxy spqr``: the estimate is ``1/2 sum_n g_n (dW H dW^T)_nn`` of SpQR's own result
    (outliers included, counted), every ``row_sample``-th stat group scaled up to all rows."""
    from hfcompress.algorithms.spqr import prepare_hessian, spqr

    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.2, 3, 64)
    H = x.t() @ x                                                           # [64, 64]
    w = torch.randn(96, 64, generator=gen) * 0.05
    w[5, 7] = 1.0                                                           # an outlier
    g = torch.rand(96, generator=gen)
    spec = SpQRSpec(bits=3, group_size=16, stat_group_size=32)
    res = spqr(w, prepare_hessian(H, 0.1, True), 3, 16, 3, 32, 0.6)
    dw = SpQRLinear.from_codes(res, spec).dequantize() - w
    expected = 0.5 * float(sum(g[n] * dw[n] @ H @ dw[n] for n in range(96)))
    score, nnz = bench.spqr_estimate(w, H, g, spec, 0.6, 0.1, row_sample=1)
    assert score == pytest.approx(expected, rel=1e-5)
    assert nnz == res.outlier_rows.numel() and nnz >= 1
    assert ((res.outlier_rows == 5) & (res.outlier_cols == int((res.perm == 7).nonzero()))).any()
    # every other stat group of 32 rows (rows 0-31 and 64-95), scaled by 96 / 64
    rows = torch.cat([torch.arange(32), torch.arange(64, 96)])
    res2 = spqr(w[rows], prepare_hessian(H, 0.1, True), 3, 16, 3, 32, 0.6)
    dw2 = SpQRLinear.from_codes(res2, spec).dequantize() - w[rows]
    expected2 = 0.5 * float(sum(g[r] * dw2[i] @ H @ dw2[i] for i, r in enumerate(rows.tolist()))) * 1.5
    score2, nnz2 = bench.spqr_estimate(w, H, g, spec, 0.6, 0.1, row_sample=2)
    assert score2 == pytest.approx(expected2, rel=1e-5)
    assert nnz2 == res2.outlier_rows.numel() * 1.5
    # no outliers: none counted, and a larger estimate (the outlier's error stays)
    score_inf, nnz_inf = bench.spqr_estimate(w, H, g, spec, float("inf"), 0.1, row_sample=1)
    assert nnz_inf == 0 and score_inf > 1.1 * score


def test_fisher_pass_collects_each_inputs_hessian_once():
    bench = _bench_module()
    model = llama_gqa(seed=1).float().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    windows = torch.cat([inputs(batch=2, seq=16, seed=s) for s in range(2)])   # [4, 16]
    xs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: xs.setdefault(n, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        for row in windows:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    fisher, energy, hess = bench.fisher_and_energy(model, windows, names, full=True)
    assert sorted(hess) == sorted({bench.input_key(n) for n in names})
    assert bench.input_key("model.layers.0.self_attn.v_proj") == "model.layers.0.self_attn.q_proj"
    assert bench.input_key("model.layers.1.mlp.up_proj") == "model.layers.1.mlp.gate_proj"
    for n in names:
        x = torch.cat(xs[n])                                                  # [T, K]
        torch.testing.assert_close(hess[bench.input_key(n)], x.t() @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(energy[n], x.square().sum(0), rtol=1e-4, atol=1e-4)
        assert fisher[n].shape == model.get_submodule(n).weight.shape and bool((fisher[n] > 0).any())
