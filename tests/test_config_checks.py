"""Small silent cases (#20 item 6): format_version 0 refused, modules_to_not_convert names that match
no module refused (quantizing) or warned about (reloading) with the closest names, and a GPTQ
calibration dataset of a wrong type refused when the config is built."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
import tiny_models as tm
from hfcompress.config import ConfigError, HfCompressConfig


def test_config_format_version_zero_refused(tmp_path):
    d = hfcompress.RTNConfig(bits=4, group_size=32).to_dict()
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=rf"format_version={bad}"):
            HfCompressConfig.from_dict({**d, "format_version": bad})
    hfcompress.quantize_(tm.llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="format_version=0"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_modules_to_not_convert_typo_refused_with_closest_names(tmp_path):
    tm.llama_gqa(0).save_pretrained(tmp_path)
    cfg = hfcompress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=["lm_haed"])
    with pytest.raises(ConfigError, match=r"'lm_haed' matches no module.*lm_head"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    cfg = hfcompress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=["model.layers.0.mlp.down_prj"])
    with pytest.raises(ConfigError, match=r"down_prj.*model\.layers\.0\.mlp\.down_proj"):
        hfcompress.quantize_(tm.llama_gqa(0), cfg)
    # names and patterns that do match are accepted, and the layer stays float
    ok = hfcompress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=["mlp.down_proj", r"model\.layers\.1\..*"])
    q = hfcompress.quantize_(tm.llama_gqa(0), ok)
    assert isinstance(q.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(q.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(q.model.layers[0].self_attn.q_proj, hfcompress.QuantLinear)


def test_config_modules_to_not_convert_unmatched_on_reload_warns(tmp_path):
    hfcompress.quantize_(tm.llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].append("lm_haed")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert any("lm_haed" in str(w.message) and "lm_head" in str(w.message) for w in caught)


def test_config_gptq_dataset_type_checked_at_construction():
    with pytest.raises(ConfigError, match=r"quantization_config\.dataset.*int"):
        hfcompress.GPTQConfig(dataset=42)
    with pytest.raises(ConfigError, match=r"quantization_config\.dataset"):
        hfcompress.GPTQConfig(dataset=3.5)
    for ok in (None, "calibration", ["some text"], torch.tensor([[1, 2, 3]]), [[1, 2, 3]]):
        hfcompress.GPTQConfig(dataset=ok)
