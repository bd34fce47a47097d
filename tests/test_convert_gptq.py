"""GPTQ import (hfcompress.convert.gptq_to_int_group): checkpoints written by GPTQModel 7.6.0 itself
(tests/fixtures/gptq/, made by tests/fixtures/make_gptq_checkpoints.py) convert into int_group
with dequantized weights bit-identical to GPTQModel's own dequantization; what cannot convert
exactly is refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.convert.gptq_to_int_group import ConversionError, GPTQSource, convert_layer
from hfcompress.formats.int_group import pack_codes, unpack_codes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "gptq")
CASES = sorted(os.listdir(FIXTURES)) if os.path.isdir(FIXTURES) else []


def digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_gptq(path, dtype=torch.float16):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfcompress.FromGPTQConfig(), dtype=dtype)


def test_fixture_matrix_is_complete():
    """The committed matrix covers every bits x sym x desc_act, several group sizes and both zero-point formats."""
    seen = {tuple(json.load(open(os.path.join(FIXTURES, c, "reference.json")))["case"][k]
                  for k in ("bits", "sym", "desc_act")) for c in CASES}
    assert seen == {(b, s, d) for b in (2, 3, 4, 8) for s in (True, False) for d in (True, False)}
    cases = [json.load(open(os.path.join(FIXTURES, c, "reference.json")))["case"] for c in CASES]
    assert {c["group_size"] for c in cases} >= {16, 32, -1}
    assert {c["format"] for c in cases} == {"gptq", "gptq_v2"}


@pytest.mark.parametrize("case", CASES)
def test_gptqmodel_checkpoint_converts_bit_exactly(case):
    path = os.path.join(FIXTURES, case)
    ref = json.load(open(os.path.join(path, "reference.json")))
    tensors = load_file(os.path.join(path, "reference.safetensors"))
    model = load_gptq(path)
    q = model.config.quantization_config
    spec = ref["case"]
    assert (q.algorithm, q.bits, q.group_size, q.sym) == ("from_gptq", spec["bits"], spec["group_size"], spec["sym"])
    assert q.act_order == (spec["desc_act"] and spec["group_size"] != -1)  # per-channel: g_idx is all zeros
    assert q.source["checkpoint_format"] == spec["format"] and q.source["quantizer"] == ["gptqmodel:7.6.0"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, hfcompress.QuantLinear)}
    assert sorted(layers) == sorted(ref["layers"])
    for name, info in ref["layers"].items():
        w = layers[name].dequantize(torch.float16)
        assert list(w.shape) == info["shape"]
        assert digest(w) == info["sha256"], f"{case}: {name} differs from GPTQModel's dequantized weight"
    for key, w in tensors.items():  # the cases stored in full: equal, element by element
        if key.endswith(".weight"):
            assert torch.equal(layers[key.removesuffix(".weight")].dequantize(torch.float16), w)
    with torch.no_grad():
        logits = model(tensors["input_ids"]).logits.float()
    ref_logits = tensors["logits"]
    # both forwards run in fp16 with their own accumulation order: a few fp16 ulps (2**-11) apart
    assert (logits - ref_logits).abs().max() <= 5e-3 * ref_logits.abs().max()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("w3-asym-act-g16-gptq", "w2-sym-noact-g16-gptq_v2",
                                                                       "w8-asym-act-g32"))])
def test_fp32_weights_equal_the_gptq_formula(case):
    """An independent reading of the stored GPTQ tensors (fp32, exact): W = s * (q - z)."""
    path = os.path.join(FIXTURES, case)
    q = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    sd = load_file(os.path.join(path, "model.safetensors"))
    model = load_gptq(path, dtype=torch.float32)
    bits, v1 = q["bits"], q["checkpoint_format"] == "gptq"
    for name, mod in model.named_modules():
        if not isinstance(mod, hfcompress.QuantLinear):
            continue
        n, k = mod.out_features, mod.in_features
        codes = unpack_codes(sd[f"{name}.qweight"].t().contiguous(), bits, k).float()  # [N, K]
        packed_z = sd[f"{name}.qzeros"]
        pad = (-packed_z.shape[1]) % bits
        z = unpack_codes(torch.nn.functional.pad(packed_z, (0, pad)), bits, n).long()  # [G, N]
        if v1:  # stored z - 1 (no field here was stored as -1, so no carries to follow)
            z = (z + 1) % (1 << bits)
        g = sd[f"{name}.g_idx"].long()
        s = sd[f"{name}.scales"].float()
        expected = (codes - z.t()[:, g].float()) * s.t()[:, g]
        assert torch.equal(mod.dequantize(torch.float32), expected), name
        assert torch.equal(mod.bias, sd[f"{name}.bias"].float())


def test_converted_checkpoint_saves_reloads_and_says_where_it_came_from(tmp_path):
    src = os.path.join(FIXTURES, "w4-asym-act-g16-gptq")
    model = load_gptq(src)
    out = tmp_path / "converted"
    model.save_pretrained(out)
    config = json.load(open(out / "config.json"))["quantization_config"]
    assert config["quant_method"] == "hfcompress" and config["algorithm"] == "from_gptq"
    assert config["source"]["format"] == "gptq" and config["source"]["name_or_path"] == src
    card = open(out / "README.md").read()
    assert "- gptq" in card and "checkpoint_format `gptq`" in card and "gptqmodel:7.6.0" in card
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.config.quantization_config, hfcompress.FromGPTQConfig)
    for name, mod in model.named_modules():
        if isinstance(mod, hfcompress.QuantLinear):
            other = again.get_submodule(name)
            for buf in ("weight", "weight_scale", "weight_zero", "weight_g_idx"):
                a, b = getattr(mod, buf), getattr(other, buf)
                assert (a is None and b is None) or torch.equal(a, b), (name, buf)
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_card_links_a_hub_source_as_base_model():
    from hfcompress.convert.from_gptq import card_data

    data = card_data({"name_or_path": "someone/Model-GPTQ-Int4", "checkpoint_format": "gptq_v2",
                      "quantizer": ["gptqmodel:7.6.0"]})
    assert data["base_model"] == "someone/Model-GPTQ-Int4" and "gptq" in data["tags"]
    assert "`gptq_v2`" in data["description"]


def test_cli_convert_writes_the_same_tensors(tmp_path):
    from hfcompress.cli.main import main

    src = os.path.join(FIXTURES, "w3-sym-noact-g16-gptq")
    assert main(["convert", src, "--from", "gptq", "--out", str(tmp_path / "cli")]) == 0
    load_gptq(src).save_pretrained(tmp_path / "api")
    a, b = load_file(tmp_path / "cli" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "cli" / "config.json"))["quantization_config"]["sym"] is True


def test_cli_convert_refuses_a_float_model(tmp_path, capsys):
    from hfcompress.cli.main import main
    from tiny_models import llama_gqa

    llama_gqa().save_pretrained(tmp_path / "float")
    assert main(["convert", str(tmp_path / "float"), "--from", "gptq", "--out", str(tmp_path / "out")]) == 2
    assert "GPTQ" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- refusals ------------------------------------------------------------------------------------
def test_cli_convert_into_its_own_source_is_refused(tmp_path, capsys):
    from hfcompress.cli.main import main

    src = _copy_case(tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["convert", str(src), "--from", "gptq", "--out", str(src) + "/"]) == 2
    assert "is the GPTQ checkpoint itself" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def _copy_case(tmp_path, case="w4-asym-act-g16-gptq"):
    dst = tmp_path / case
    shutil.copytree(os.path.join(FIXTURES, case), dst)
    return dst


def _edit_config(path, **fields):
    cfg = json.load(open(path / "config.json"))
    cfg["quantization_config"].update(fields)
    json.dump(cfg, open(path / "config.json", "w"))


@pytest.mark.parametrize("fields, match", [
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not convertible"),
    ({"bits": 5}, r"bits=5 is not convertible"),
    ({"pack_dtype": "int16"}, r"pack_dtype='int16'"),
    ({"dynamic": {r"+:.*down.*": {"bits": 8}}}, r"dynamic=.*per-module overrides"),
])
def test_unconvertible_configs_are_refused_by_field(tmp_path, fields, match):
    path = _copy_case(tmp_path)
    _edit_config(path, **fields)
    with pytest.raises(ConversionError, match=match):
        load_gptq(path)


def test_unconvertible_tensors_are_refused_by_name(tmp_path):
    path = _copy_case(tmp_path)
    sd = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    scales = sd[f"{name}.scales"].float()
    scales[0, 0] = 1e5  # fits bf16, not fp16
    save_file({**sd, f"{name}.scales": scales.to(torch.bfloat16)}, path / "model.safetensors")
    with pytest.raises(ConversionError, match=rf"{name}\.scales in torch.bfloat16 do not all fit float16"):
        load_gptq(path)
    del sd[f"{name}.qzeros"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ConversionError, match=rf"{name}\.qzeros is missing"):
        load_gptq(path)


def test_from_gptq_config_on_a_float_model_is_refused(tmp_path):
    from tiny_models import llama_gqa

    llama_gqa().save_pretrained(tmp_path / "float")
    with pytest.raises(hfcompress.ConfigError, match="no GPTQ quantization_config"):
        load_gptq(tmp_path / "float")


def test_plain_gptq_loading_is_untouched():
    """Without FromGPTQConfig a GPTQ checkpoint goes to transformers' own GPTQ path (which here
    asks for its backend), never silently through hfcompress."""
    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "w4-asym-act-g16-gptq"))
    assert "hfcompress" not in str(info.value)


# -- the v1 zero-point convention ----------------------------------------------------------------
_WORD = {2: 0b01010101010101010101010101010101, 4: 0b00010001000100010001000100010001,
         8: 0b00000001000000010000000100000001}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_points_round_trip_gptqmodels_save_including_zero(bits):
    """GPTQModel saves v1 by subtracting 0b0001..0001 from each packed word (3-bit: 1 per field),
    borrows included, when a zero point is 0; the import inverts exactly that."""
    g = torch.Generator().manual_seed(bits)
    n, k, gs = 64, 64, 16
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    zero = torch.randint(0, 1 << bits, (k // gs, n), generator=g)
    zero[0, :5] = 0  # the fields that borrow
    qzeros = pack_codes(zero, bits)
    if bits == 3:
        v1 = pack_codes((zero - 1) % 8, bits)
    else:
        words = ((qzeros.long() & 0xFFFFFFFF) - _WORD[bits]) & 0xFFFFFFFF
        v1 = torch.where(words >= 2**31, words - 2**32, words).int()
    tensors = {"qweight": pack_codes(codes, bits).t().contiguous(), "qzeros": v1,
               "scales": torch.rand(k // gs, n, generator=g).half(), "g_idx": torch.arange(k, dtype=torch.int32) // gs}
    source = GPTQSource(bits=bits, group_size=gs, sym=False, desc_act=False, checkpoint_format="gptq")
    layer = convert_layer(tensors, source, k, n, where="layer")
    assert torch.equal(layer.zero.long(), zero.t()) and torch.equal(layer.codes.long(), codes)
    assert layer.g_idx is None  # the natural grouping is not stored
