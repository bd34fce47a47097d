"""Smaller first-hour items: transformers' public quantizer registration, ``.half()`` like
``.to(torch.float16)``, and one storage default (fp16) for EoRA adapters from Python and the CLI."""

from __future__ import annotations

import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_models import inputs, llama_gqa
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as tq_auto

import hfcompress
from hfcompress.integrations import transformers as integ


def test_registration_goes_through_transformers_public_api(monkeypatch):
    calls = []

    def recording(public):
        def register(name):
            calls.append((public.__name__, name))
            return public(name)
        return register

    monkeypatch.setattr(integ, "register_quantization_config", recording(tq_auto.register_quantization_config))
    monkeypatch.setattr(integ, "register_quantizer", recording(tq_auto.register_quantizer))
    monkeypatch.delitem(tq_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "hfcompress")
    monkeypatch.delitem(tq_auto.AUTO_QUANTIZER_MAPPING, "hfcompress")
    integ.register()
    integ.register()  # idempotent: the public functions refuse a second registration; it is not attempted
    assert calls == [("register_quantization_config", "hfcompress"), ("register_quantizer", "hfcompress")]
    assert tq_auto.AUTO_QUANTIZER_MAPPING["hfcompress"] is integ.HfCompressQuantizer
    assert tq_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hfcompress"] is hfcompress.HfCompressConfig


def test_half_float_bfloat16_match_to_dtype(tmp_path):
    hfcompress.quantize_(llama_gqa(), hfcompress.RTNConfig(bits=4, group_size=32)).save_pretrained(tmp_path)
    x = inputs()
    for method, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16), ("float", torch.float32)):
        a = getattr(AutoModelForCausalLM.from_pretrained(tmp_path), method)()  # transformers refuses these for
        b = AutoModelForCausalLM.from_pretrained(tmp_path).to(dtype)          # quantized models; ours cast
        assert a.dtype == dtype and a.model.layers[0].mlp.up_proj.compute_dtype == dtype
        with torch.no_grad():
            assert torch.equal(a(x).logits, b(x).logits)
    float_model = llama_gqa().half()  # other models: transformers' own method
    assert float_model.dtype == torch.float16


def _lora_dtypes(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_compensate_saves_fp16_by_default_like_the_cli(tmp_path):
    from hfcompress.cli.main import main

    float_model = llama_gqa(3)
    float_model.save_pretrained(tmp_path / "float")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfcompress.RTNConfig(
        bits=3, group_size=32))
    q.save_pretrained(tmp_path / "q")
    cfg = hfcompress.EoRAConfig(rank=4, method="svd")
    pm = hfcompress.compensate(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), float_model, cfg)
    pm.save_pretrained(tmp_path / "py")
    assert _lora_dtypes(tmp_path / "py") == {"F16"}
    x = inputs()
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), tmp_path / "py")
    with torch.no_grad():
        assert torch.equal(again(x).logits, pm(x).logits)  # memory holds what the file reloads to
    assert main(["compensate", str(tmp_path / "q"), "--original", str(tmp_path / "float"), "--rank", "4",
                 "--method", "svd", "--out", str(tmp_path / "cli")]) == 0
    assert _lora_dtypes(tmp_path / "cli") == {"F16"}
    from safetensors.torch import load_file

    py, cli = load_file(str(tmp_path / "py" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert sorted(py) == sorted(cli) and all(torch.equal(py[k], cli[k]) for k in py)
    pm32 = hfcompress.compensate(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), float_model, cfg,
                                 save_dtype=None)
    pm32.save_pretrained(tmp_path / "fp32")
    assert _lora_dtypes(tmp_path / "fp32") == {"F32"}
