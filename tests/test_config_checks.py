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


# -- item 1: config.json that disagrees with the stored tensors --------------------------------------
def _edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    # integer zeros (the tensors whose shapes the edited fields change) and g_idx groups
    hfcompress.quantize_(tm.llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32, zero_point="int")
                         ).save_pretrained(root / "asym")
    hfcompress.quantize_(tm.llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32, sym=True)).save_pretrained(
        root / "sym")
    gptq = hfcompress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False, zero_point="int",
                                 n_samples=2, seq_len=16)
    hfcompress.quantize_(tm.llama_gqa(0), gptq, batches=[tm.inputs(batch=2, seq=16)]).save_pretrained(root / "act")
    return root


@pytest.mark.parametrize("ckpt,edit,tensor,field", [
    ("asym", {"sym": True}, "weight_zero", "sym"),
    ("sym", {"sym": False}, "weight_zero", "sym"),
    ("act", {"act_order": False}, "weight_g_idx", "act_order"),
    ("asym", {"act_order": True}, "weight_g_idx", "act_order"),
], ids=["sym-edited-true", "sym-edited-false", "act_order-edited-false", "act_order-edited-true"])
def test_config_disagreeing_with_stored_tensors_refused(saved, tmp_path, ckpt, edit, tensor, field):
    import shutil

    d = tmp_path / ckpt
    shutil.copytree(saved / ckpt, d)
    _edit_config(d, **edit)
    with pytest.raises(ValueError) as e:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert f".{tensor}" in msg and f"quantization_config.{field}" in msg, msg


def test_config_unknown_tensor_under_compressed_layer_refused(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra"
    shutil.copytree(saved / "asym", d)
    f = str(d / "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight_outliers"] = torch.zeros(3)
    save_file(tensors, f, metadata={"format": "pt"})  # written by hand: no save identity either
    _edit_config(d, save_id=None)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_outliers"):
        AutoModelForCausalLM.from_pretrained(d)
