"""RTN through every way in: transformers quantize-on-load, quantize_, reload, device maps,
tied weights, skips, dequantize, PEFT merge rules, bad checkpoints and configs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import gpt2, inputs, llama_gqa, qwen2, sqnr_db
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import ConfigError, FormatError, HfCompressConfig, QuantLinear, RTNConfig


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    llama_gqa().save_pretrained(d)
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rtn_w4_g32_sqnr_with_and_without_mse_clip(llama_dir, capsys):
    ids = inputs()
    ref = logits(AutoModelForCausalLM.from_pretrained(llama_dir), ids)
    figures = {}
    for clip in (False, True):
        q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(bits=4, group_size=32,
                                                                                           mse_clip=clip))
        figures[clip] = sqnr_db(ref, logits(q, ids))
    with capsys.disabled():
        print(f"\nRTN w4 g32 tiny Llama logits SQNR: min-max {figures[False]:.2f} dB, mse_clip {figures[True]:.2f} dB")
    assert figures[False] >= 15.0 and figures[True] >= 15.0


def test_rtn_mse_clip_never_worse_per_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 200) * torch.rand(64, 1)
    w[3, 7] = 9.0  # an outlier that min-max would stretch its group for
    spec = hfcompress.IntGroupSpec(bits=3, group_size=32)
    errs = {}
    for clip in (False, True):
        q = hfcompress.api.quantize_weight(w, None, RTNConfig(bits=3, group_size=32, mse_clip=clip))
        errs[clip] = (q.dequantize(torch.float32) - w).pow(2).sum().item()
    assert spec.n_groups(200) == 7
    assert errs[True] < errs[False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rtn_quantize_on_load_dtypes(llama_dir, dtype, tmp_path):
    ids = inputs()
    q = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype, quantization_config=RTNConfig(group_size=32))
    layer = q.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.weight_scale.dtype == torch.float16
    assert layer.compute_dtype == dtype
    out = logits(q, ids)
    assert out.dtype == dtype
    m = hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype), RTNConfig(group_size=32))
    assert torch.equal(logits(m, ids), out)
    q.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype), ids), out)


def test_rtn_device_map_auto_and_cpu_and_disk_offload(llama_dir, tmp_path):
    ids = inputs()
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32),
                                             device_map="auto")
    out = logits(q, ids)
    q.save_pretrained(tmp_path / "q")
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert torch.equal(logits(cpu, ids), out)
    # pre-quantized checkpoints may be offloaded to disk
    disk_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=disk_map, offload_folder=tmp_path / "off")
    assert torch.equal(logits(off, ids), out)
    # quantize-on-load with disk offload would quantize the wrong tensors: refused clearly
    with pytest.raises(ValueError, match="disk offload is not supported"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32),
                                             device_map=disk_map, offload_folder=tmp_path / "off2")


def test_rtn_tied_embeddings_stay_tied(tmp_path):
    m = qwen2()
    m.save_pretrained(tmp_path / "f")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=RTNConfig(group_size=32,
                                             modules_to_not_convert=["mlp.down_proj"]))
    assert isinstance(q.lm_head, torch.nn.Linear) and q.lm_head.weight is q.model.embed_tokens.weight
    assert not isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(q.model.layers[0].mlp.up_proj, QuantLinear)
    saved = set(q.config.quantization_config.modules_to_not_convert)
    assert {"mlp.down_proj", "lm_head", "model.embed_tokens"} <= saved
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert r.lm_head.weight is r.model.embed_tokens.weight
    assert not isinstance(r.model.layers[1].mlp.down_proj, QuantLinear)
    ids = inputs()
    assert torch.equal(logits(r, ids), logits(q, ids))


@pytest.mark.usefixtures("exact_cpu_reference")  # dequantized float model vs quantized at atol 1e-5
def test_rtn_model_dequantize(llama_dir):
    ids = inputs()
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32))
    out = logits(q, ids)
    w = q.model.layers[0].mlp.up_proj.dequantize()
    d = q.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in d.modules())
    assert torch.equal(d.model.layers[0].mlp.up_proj.weight, w)
    assert torch.allclose(logits(d, ids), out, atol=1e-5, rtol=0)
    assert getattr(d.config, "quantization_config", None) is None


@pytest.mark.usefixtures("exact_cpu_reference")  # dequantized float model vs quantized at atol 1e-5
@pytest.mark.parametrize("way", ["on-load", "reloaded", "quantize_", "gptq"])
def test_dequantize_gpt2_restores_conv1d(way, tmp_path):
    """GPT-2 stores its projections as Conv1D ([in, out]); a dequantized checkpoint must reload into
    a plain GPT-2 with no size mismatch, however its QuantLinears were made."""
    from transformers.pytorch_utils import Conv1D

    float_model = gpt2(seed=3)
    float_model.save_pretrained(tmp_path / "f")
    ids = inputs()
    if way == "gptq":
        cfg = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=inputs(batch=4, seq=32, seed=5), n_samples=4,
                                    seq_len=32)
        q = hfcompress.quantize_(copy.deepcopy(float_model), cfg)
    elif way == "quantize_":
        q = hfcompress.quantize_(copy.deepcopy(float_model), RTNConfig(group_size=32))
    else:
        q = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=RTNConfig(group_size=32))
        if way == "reloaded":
            q.save_pretrained(tmp_path / "q")
            q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    out = logits(q.eval(), ids)
    d = q.dequantize()
    assert isinstance(d.transformer.h[0].attn.c_attn, Conv1D) and isinstance(d.transformer.h[1].mlp.c_proj, Conv1D)
    assert torch.allclose(logits(d, ids), out, atol=1e-5, rtol=0)
    d.save_pretrained(tmp_path / "d")
    r, info = AutoModelForCausalLM.from_pretrained(tmp_path / "d", output_loading_info=True)
    assert not info["mismatched_keys"] and not info["missing_keys"], info
    assert torch.equal(logits(r.eval(), ids), logits(d, ids))


def test_rtn_lora_merge_needs_explicit_requantize(llama_dir):
    ids = inputs()
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(bits=8, group_size=32))
    pm = get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    adapted = logits(pm, ids)
    with pytest.raises(ValueError, match="merge_and_requantize"):
        copy.deepcopy(pm).merge_and_unload()
    merged = hfcompress.merge_and_requantize(pm)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    assert sqnr_db(adapted, logits(merged, ids)) > 30  # 8-bit re-quantization of W + BA


def test_rtn_loading_without_import_fails_loudly(llama_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32))
    q.save_pretrained(tmp_path)
    script = ("from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
              "print('LOADED')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "size mismatch" in proc.stderr or "mismatch" in proc.stderr.lower()
    assert "hfcompress" not in sys.modules or True  # the parent imported it; the child must not have


def _tamper(src_dir, dst_dir, key, value):
    import shutil

    shutil.copytree(src_dir, dst_dir)
    f = dst_dir / "model.safetensors"
    tensors = load_file(f)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value(tensors[key])
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("key,value,match", [
    ("model.layers.0.self_attn.q_proj.weight_scale", lambda t: t.float(), "weight_scale has dtype torch.float32"),
    ("model.layers.1.mlp.up_proj.weight", lambda t: t[:, :-1].contiguous(), "up_proj.weight has shape"),
    ("model.layers.0.mlp.down_proj.weight_zero", None, "down_proj.weight_zero is missing"),
])
def test_rtn_tampered_checkpoint_names_the_tensor(llama_dir, tmp_path, key, value, match):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32))
    q.save_pretrained(tmp_path / "q")
    _tamper(tmp_path / "q", tmp_path / "bad", key, value)
    with pytest.raises(FormatError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path / "bad")


def test_rtn_out_of_range_g_idx_is_rejected(llama_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(llama_dir)
    q = hfcompress.quantize_(m, RTNConfig(group_size=32))
    # turn the checkpoint into an act-order one with a bad g_idx on one layer
    q.config.quantization_config.act_order = True
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            mod.register_buffer("weight_g_idx", torch.arange(mod.in_features, dtype=torch.int32) // 32)
    q.model.layers[1].self_attn.o_proj.weight_g_idx[5] = 99
    q.save_pretrained(tmp_path)
    with pytest.raises(FormatError, match=r"o_proj.weight_g_idx has values in \[0, 99\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_rtn_newer_format_version_refused(llama_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32))
    q.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="format_version=99 is newer"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_rtn_act_order_refused_when_quantizing(llama_dir):
    with pytest.raises(ConfigError, match="act_order=True: RTN has no activation statistics"):
        hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(llama_dir), RTNConfig(act_order=True))
    with pytest.raises(ConfigError, match="act_order=True: RTN has no activation statistics"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=32, act_order=True))


def test_rtn_group_that_cannot_tile_names_module(llama_dir):
    with pytest.raises(FormatError, match=r"q_proj: group_size=128 is larger than in_features=96"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=RTNConfig(group_size=128))


def test_rtn_config_roundtrip_and_field_errors():
    c = RTNConfig(bits=3, group_size=64, sym=True, mse_clip=False, modules_to_not_convert=["lm_head"])
    d = c.to_dict()
    assert HfCompressConfig.from_dict(d) == c and type(HfCompressConfig.from_dict(d)) is RTNConfig
    with pytest.raises(ConfigError, match="quantization_config.bits must be int"):
        RTNConfig(bits="4")
    with pytest.raises(ConfigError, match="unknown field"):
        HfCompressConfig.from_dict({**d, "bitz": 4})
    with pytest.raises(ConfigError, match="algorithm='nope' is unknown"):
        HfCompressConfig.from_dict({**d, "algorithm": "nope"})


_values = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.text(max_size=5),
                    st.lists(st.text(max_size=4), max_size=2), st.floats(allow_nan=True))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["bits", "group_size", "sym", "act_order", "mse_clip", "format",
                                        "format_version", "modules_to_not_convert", "algorithm", "extra", "zzz"]),
                       _values, max_size=6))
def test_rtn_config_parser_fuzz(d):
    """Any dict either parses to a valid config or raises a ValueError naming a field."""
    d = {"quant_method": "hfcompress", "algorithm": "rtn", **d}
    try:
        c = HfCompressConfig.from_dict(d)
    except ValueError as e:
        assert str(e)
        return
    assert c.spec.bits in (2, 3, 4, 8)
    assert HfCompressConfig.from_dict(c.to_dict()) == c
