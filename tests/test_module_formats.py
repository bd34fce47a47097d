"""The per-module format table (``module_formats`` in config.json): several bit widths and
formats in one checkpoint, built by every loader from the table, saved and reloaded bit for bit,
shown by inspect and on the card, and refused with errors naming the module and the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, inputs, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import ConfigError, GPTQConfig, RTNConfig
from hfcompress.formats import get_format, is_compressed

TABLE = {
    "model.layers.0.self_attn.q_proj": {"bits": 2},
    "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32},
    "model.layers.1.mlp.up_proj": {"format": "spqr", "bits": 3, "group_size": 16},
}


def _specs(model) -> dict:
    return {n: m.spec for n, m in model.named_modules() if is_compressed(m)}


def test_table_resolves_once_and_fills_fields_from_the_config():
    c = RTNConfig(bits=4, group_size=64, module_formats={"a.b": {"bits": 3}, "c.d": {"format": "spqr"}})
    assert c.spec_for("a.b").bits == 3 and c.spec_for("a.b").group_size == 64  # config fields fill the entry
    assert get_format(c.spec_for("c.d")).name == "spqr" and c.spec_for("c.d").group_size == 16  # spqr defaults
    assert c.spec_for("x.y") == c.spec
    d = c.to_dict()["module_formats"]
    # (zero_point too: the config's own, RTN's default float zeros)
    assert d["a.b"] == {"format": "int_group", "bits": 3, "group_size": 64, "sym": False, "act_order": False,
                        "zero_point": "float"}
    assert hfcompress.HfCompressConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("table, words", [
    ({"m.q": {"bits": 5}}, ["module_formats['m.q']", "bits=5"]),
    ({"m.q": {"bitz": 3}}, ["module_formats['m.q']", "bitz"]),
    ({"m.q": {"format": "nope"}}, ["module_formats['m.q'].format='nope'"]),
    ({"m.q": {"format": "int_group", "format_version": 9}}, ["module_formats['m.q'].format_version=9"]),
    ({"m.q": 3}, ["module_formats['m.q']", "dict"]),
    ({"m.q": {"group_size": 12}}, ["module_formats['m.q']", "group_size=12"]),
])
def test_bad_entries_name_the_module_and_the_field(table, words):
    with pytest.raises(ConfigError) as e:
        RTNConfig(module_formats=table)
    for w in words:
        assert w in str(e.value)


def test_table_names_must_be_converted_linear_layers(tmp_path):
    model = llama_gqa()
    with pytest.raises(ConfigError, match=r"module_formats\['model.layers.0.self_attn.q_prj'\].*closest: "
                                          r"model.layers.0.self_attn.q_proj"):
        hfcompress.quantize_(model, RTNConfig(module_formats={"model.layers.0.self_attn.q_prj": {"bits": 2}}))
    with pytest.raises(ConfigError, match=r"module_formats\['lm_head'\].*modules_to_not_convert"):
        hfcompress.quantize_(llama_gqa(), RTNConfig(module_formats={"lm_head": {"bits": 2}}))


def test_rtn_on_load_builds_each_module_from_the_table(tmp_path):
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    table = {k: v for k, v in TABLE.items() if v.get("format") != "spqr"}  # RTN writes int_group only
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=RTNConfig(bits=4, group_size=32,
                                                                                 module_formats=table))
    specs = _specs(q)
    assert specs["model.layers.0.self_attn.q_proj"].bits == 2
    assert specs["model.layers.0.mlp.down_proj"].bits == 8
    assert specs["model.layers.1.self_attn.q_proj"].bits == 4
    # the 2-bit layer really is 2-bit: at most 4 distinct codes per group
    w = q.model.layers[0].self_attn.q_proj.dequantize(torch.float32)
    assert max(len(torch.unique(w[r, :32])) for r in range(w.shape[0])) <= 4
    assert max(len(torch.unique(q.model.layers[1].self_attn.q_proj.dequantize(torch.float32)[r, :32]))
               for r in range(8)) > 4


def test_gptq_mixed_formats_save_reload_bit_exact_inspect_and_card(tmp_path, exact_cpu_reference):
    torch.manual_seed(0)
    model = llama_gqa()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 160, (2, 32), generator=g) for _ in range(2)]
    # SpQR entries need a SpQR algorithm; GPTQ writes int_group ones at several widths
    table = {k: v for k, v in TABLE.items() if v.get("format") != "spqr"}
    # integer zeros and g_idx groups, which the bit counts and the card's settings below spell out
    config = GPTQConfig(bits=3, group_size=32, static_groups=False, zero_point="int", module_formats=table)
    hfcompress.quantize_(model, config, batches=batches)
    specs = _specs(model)
    assert {s.bits for s in specs.values()} == {2, 3, 8}
    ids = inputs()
    with torch.no_grad():
        before = model(ids).logits
    out = tmp_path / "mixed"
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["module_formats"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    re = AutoModelForCausalLM.from_pretrained(out)
    assert _specs(re) == specs
    sd, sd_re = model.state_dict(), re.state_dict()
    assert all(torch.equal(sd[k], sd_re[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(re(ids).logits, before)
    # saving again writes the same tensors
    re.save_pretrained(tmp_path / "again")
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from hfcompress.inspect import format_summary, summarize

    s = summarize(str(out))
    by_name = {lay.name: lay for lay in s.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].setting.startswith("int_group 2b g32")
    assert by_name["model.layers.0.mlp.down_proj"].setting.startswith("int_group 8b g32")
    # stored bits follow each layer's own spec
    assert by_name.keys() == specs.keys()
    for name, lay in by_name.items():
        assert lay.bits_per_weight == specs[name].bits_per_weight(lay.out_features, lay.in_features)
    assert by_name["model.layers.0.mlp.down_proj"].bits_per_weight > 8 > 3 > by_name[
        "model.layers.0.self_attn.q_proj"].bits_per_weight
    text = format_summary(s)
    assert "per-module format table: 2 entries" in text and "int_group 8b g32" in text

    from hfcompress.hub.cards import render_card

    card = str(render_card(str(out)))
    assert "Per-layer allocation" in card and "| model.layers.0.mlp.down_proj | int_group | 8 | 32 |" in card
    assert "| int_group 2-bit, group 32 (act_order=True, sym=False) | 1 |" in card


def test_mixed_formats_reload_int_group_and_spqr_in_one_checkpoint(tmp_path, exact_cpu_reference):
    """A checkpoint whose table mixes two formats loads natively: each module is built as its
    entry says (layers written here with each format's data-free fallback)."""
    model = llama_gqa()
    config = RTNConfig(bits=4, group_size=32, module_formats=TABLE)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            spec = config.spec_for(name)
            layer = get_format(spec).layer_cls.from_float(module.weight.data, module.bias, spec)
            hfcompress.modules.set_submodule(model, name, layer)
    config.modules_to_not_convert = ["lm_head"]
    model.config.quantization_config = config
    from hfcompress.api import AFTER_QUANTIZE_HOOKS

    for hook in AFTER_QUANTIZE_HOOKS:
        hook(model, config)
    ids = inputs()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(re.model.layers[1].mlp.up_proj).__name__ == "SpQRLinear"
    assert re.model.layers[0].mlp.down_proj.spec.bits == 8
    with torch.no_grad():
        assert torch.equal(re(ids).logits, before)


def test_reload_refuses_a_table_edited_against_the_tensors(tmp_path):
    model = llama_gqa()
    hfcompress.quantize_(model, RTNConfig(bits=4, group_size=32,
                                          module_formats={"model.layers.0.self_attn.q_proj": {"bits": 2}}))
    model.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["module_formats"]["model.layers.0.self_attn.q_proj"]["bits"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"model.layers.0.self_attn.q_proj.weight has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
