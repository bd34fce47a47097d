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
