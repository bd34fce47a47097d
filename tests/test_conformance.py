"""The battery every method row of tests/conformance.py passes on every tiny model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conformance import LORA_TARGETS, METHODS
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import BUILDERS, inputs, sqnr_db
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hfcompress
from hfcompress.nn import QuantLinear

CASES = [pytest.param(spec, model, id=f"{spec.id}-{model}") for spec in METHODS for model in spec.models]


def auto_cls(model_name):
    return AutoModelForMaskedLM if model_name == "bert" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    out = {}
    for name, build in BUILDERS.items():
        d = tmp_path_factory.mktemp(f"float-{name}")
        build().save_pretrained(d)
        out[name] = str(d)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec,model_name", CASES)
def test_conformance(spec, model_name, float_dirs, tmp_path):
    ids = inputs()
    cls = auto_cls(model_name)
    float_model = cls.from_pretrained(float_dirs[model_name]).eval()
    ref = logits(float_model, ids)

    # 1. quantize-on-load == quantize_ in memory, exactly; no missing/unexpected keys
    loaded, info = cls.from_pretrained(float_dirs[model_name], quantization_config=spec.make_config(),
                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_quant >= 4, f"only {n_quant} layers were quantized"
    in_memory = hfcompress.quantize_(copy.deepcopy(float_model), spec.make_config(), **spec.quantize_kwargs(model_name))
    out = logits(loaded.eval(), ids)
    assert torch.equal(out, logits(in_memory.eval(), ids))

    # 2. quality against float
    assert sqnr_db(ref, out) >= spec.sqnr_min

    # 3. (fresh-process reload: test_fresh_process_reload, one subprocess for all rows of a method)
    qdir = tmp_path / "q"
    loaded.save_pretrained(qdir)
    qcfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "hfcompress" and qcfg["format"] == "int_group"

    # 4. plain peft LoRA attaches, trains only adapter params, saves and reloads exactly
    base = cls.from_pretrained(qdir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_name]))
    buffers_before = {n: b.clone() for n, b in peft_model.named_buffers()}
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, b in peft_model.named_buffers():
        assert torch.equal(b, buffers_before[n]), f"{n} changed during adapter training"
    peft_model.eval()
    adapted = logits(peft_model, ids)
    assert not torch.equal(adapted, out), "training changed nothing"
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(cls.from_pretrained(qdir), tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded, ids), adapted)


RELOAD_SCRIPT = """
import json, sys, torch
import hfcompress
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from safetensors.torch import load_file, save_file
cls = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}[sys.argv[1]]
ids = load_file(sys.argv[2])["ids"]
for qdir, out in json.loads(sys.argv[3]):
    m, info = cls.from_pretrained(qdir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (qdir, info)
    with torch.no_grad():
        save_file({"logits": m.eval()(ids).logits.contiguous()}, out)
"""

RELOAD_CASES = sorted({(spec.id.split("-")[0], m) for spec in METHODS for m in spec.models})


@pytest.mark.parametrize("method,model_name", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in RELOAD_CASES])
def test_fresh_process_reload(method, model_name, float_dirs, tmp_path):
    """Every row of ``method``: saved checkpoint -> from_pretrained in a new process, bit-exact logits."""
    specs = [s for s in METHODS if s.id.split("-")[0] == method and model_name in s.models]
    ids = inputs()
    cls = auto_cls(model_name)
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    jobs, expected = [], {}
    for spec in specs:
        q = cls.from_pretrained(float_dirs[model_name], quantization_config=spec.make_config()).eval()
        qdir, out = tmp_path / spec.id, tmp_path / f"{spec.id}.out.safetensors"
        q.save_pretrained(qdir)
        expected[str(out)] = logits(q, ids)
        jobs.append((str(qdir), str(out)))
    kind = "masked" if model_name == "bert" else "causal"
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, kind, str(tmp_path / "ids.safetensors"),
                           json.dumps(jobs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for out, ref in expected.items():
        assert torch.equal(load_file(out)["logits"], ref), out


# ------------------------------------------------------------------------------------------
# EoRA compensation rows: every tiny model, on an RTN 3-bit base
# ------------------------------------------------------------------------------------------

EORA_VANILLA = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from safetensors.torch import load_file, save_file
cls = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}[sys.argv[1]]
base_dir, adapter_dir, ids_file, out = sys.argv[2:6]
model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    save_file({"logits": model(load_file(ids_file)["ids"]).logits.contiguous()}, out)
assert not any(m == "hfcompress" or m.startswith("hfcompress.") for m in sys.modules), "imported hfcompress"
"""


@pytest.mark.parametrize("model_name", list(BUILDERS), ids=[f"eora-{m}" for m in BUILDERS])
@pytest.mark.usefixtures("exact_cpu_reference")  # the vanilla-peft reload on the dequantized base is compared at fp32 tolerance
def test_eora_conformance(model_name, float_dirs, tmp_path):
    """EoRA on every tiny model: the adapter reduces the held-out logits error of the compressed
    model (more than plain SVD at the same rank), reloads exactly on the reloaded quantized base,
    and loads with vanilla peft (no hfcompress import) on the dequantized base."""
    cls = auto_cls(model_name)
    calib, held_out = inputs(batch=16, seq=40, seed=11), inputs(batch=4, seq=31, seed=99)
    float_model = cls.from_pretrained(float_dirs[model_name]).eval()
    ref = logits(float_model, held_out)
    q = cls.from_pretrained(float_dirs[model_name], quantization_config=hfcompress.RTNConfig(bits=3, group_size=32))
    q.eval().save_pretrained(tmp_path / "q")
    base_sqnr = sqnr_db(ref, logits(q, held_out))

    sqnr = {}
    for method in ("svd", "eora"):
        pm = hfcompress.compensate(cls.from_pretrained(tmp_path / "q"), float_model,
                                   hfcompress.EoRAConfig(rank=8, method=method, dataset=calib))
        sqnr[method] = sqnr_db(ref, logits(pm, held_out))
    assert sqnr["svd"] > base_sqnr + 0.3, (base_sqnr, sqnr)
    assert sqnr["eora"] > sqnr["svd"] + 0.5, (base_sqnr, sqnr)
    assert any(isinstance(m.get_base_layer(), QuantLinear) for m in pm.modules() if hasattr(m, "lora_A"))

    # save / reload on the reloaded quantized base: bit-exact
    pm.save_pretrained(tmp_path / "adapter")
    adapted = logits(pm, held_out)
    again = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "q"), tmp_path / "adapter").eval()
    assert torch.equal(logits(again, held_out), adapted)

    # vanilla peft, in a process that never imports hfcompress, on the dequantized base
    deq = cls.from_pretrained(tmp_path / "q")
    deq.dequantize()
    deq.save_pretrained(tmp_path / "deq")
    save_file({"ids": held_out}, tmp_path / "ids.safetensors")
    kind = "masked" if model_name == "bert" else "causal"
    proc = subprocess.run([sys.executable, "-c", EORA_VANILLA, kind, str(tmp_path / "deq"), str(tmp_path / "adapter"),
                           str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], adapted, atol=1e-4, rtol=1e-4)
