"""compressed-tensors export (hfcompress.convert.int_group_to_compressed_tensors): the consumer's own reader
(transformers' compressed-tensors integration) loads the export and computes our logits; the
config parses with compressed-tensors' own classes; what has no exact twin is refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.convert import ConversionError, export_compressed_tensors
from hfcompress.convert.int_group_to_compressed_tensors import convert_layer
from hfcompress.formats.int_group import IntGroupSpec
from tiny_models import inputs, llama_gqa

pytest.importorskip("compressed_tensors")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "gptq")


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / ours.double().abs().max()).item()


def _check_config(path) -> dict:
    """config.json parses with compressed-tensors' own classes (what vLLM's scheme parser and
    transformers build from it) and says what we wrote."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    q = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    parsed = QuantizationConfig.model_validate(q)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    # what transformers builds from it
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(q))
    assert compressor.quantization_config.format == "pack-quantized"
    (scheme,) = parsed.config_groups.values()
    assert scheme.targets == ["Linear"] and scheme.input_activations is None
    return {"weights": scheme.weights, "ignore": parsed.ignore}


@pytest.mark.usefixtures("exact_cpu_reference")  # their fp32 dequantized matmul vs ours: both exact fp32, not the bf16 fast path
@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, False), (4, 32, True), (8, -1, True), (2, -1, False)])
def test_rtn_export_loads_in_transformers_with_our_logits(tmp_path, bits, group_size, sym):
    model = hfcompress.quantize_(llama_gqa(0), hfcompress.RTNConfig(bits=bits, group_size=group_size, sym=sym,
                                                                                  zero_point="int"))
    model.save_pretrained(tmp_path / "ours")
    export_compressed_tensors(tmp_path / "ours", tmp_path / "ct")
    info = _check_config(tmp_path / "ct")
    w = info["weights"]
    assert (w.num_bits, w.symmetric, w.strategy) == (bits, sym, "channel" if group_size == -1 else "group")
    assert w.group_size == (None if group_size == -1 else group_size) and w.actorder is None
    assert info["ignore"] == ["lm_head"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert not any(isinstance(m, hfcompress.QuantLinear) for m in theirs.modules())  # read by compressed-tensors
    x = inputs()
    with torch.no_grad():
        assert _relative_error(model(x).logits, theirs(x).logits) <= 1e-3
    for name, mod in model.named_modules():  # decompressed by the first forward: their weights are ours, exactly
        if isinstance(mod, hfcompress.QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight, mod.dequantize(torch.float32)), name


@pytest.mark.usefixtures("exact_cpu_reference")
def test_gptq_static_groups_export_as_plain_groups(tmp_path):
    """GPTQ's default static groups (act-order columns, natural groups, no g_idx) with integer zeros
    export as a plain group scheme (no actorder) and compute our logits."""
    cfg = hfcompress.GPTQConfig(bits=4, group_size=32, zero_point="int", n_samples=4, seq_len=16)
    assert cfg.act_order and cfg.static_groups
    model = hfcompress.quantize_(llama_gqa(0), cfg, batches=[inputs(batch=4, seq=16)])
    model.save_pretrained(tmp_path / "ours")
    export_compressed_tensors(tmp_path / "ours", tmp_path / "ct")
    w = _check_config(tmp_path / "ct")["weights"]
    assert (w.strategy, w.group_size, w.actorder) == ("group", 32, None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    x = inputs()
    with torch.no_grad():
        assert _relative_error(model(x).logits, theirs(x).logits) <= 1e-3
    for name, mod in model.named_modules():
        if isinstance(mod, hfcompress.QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight, mod.dequantize(torch.float32)), name


def test_default_float_zero_checkpoint_refused_naming_the_field_and_the_fix(tmp_path, capsys):
    """GPTQ's default grid stores float zeros: the export refuses it, naming zero_point and how to
    quantize an exportable checkpoint instead (one CLI line, exit 2)."""
    from hfcompress.cli.main import main as cli

    cfg = hfcompress.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=16)
    hfcompress.quantize_(llama_gqa(0), cfg, batches=[inputs(batch=4, seq=16)]).save_pretrained(tmp_path / "q")
    assert cli(["export", str(tmp_path / "q"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hfcompress export: error: ")
    assert all(w in err[0] for w in ("quantization_config.zero_point='float'", "zero_point='int'",
                                     "--zero-point int"))
    assert not (tmp_path / "ct").exists()


def test_gptq_act_order_round_trip_with_eora(tmp_path):
    """GPTQModel checkpoint -> hfcompress (+ an EoRA adapter) -> compressed-tensors: logits at each step."""
    from peft import PeftModel

    case = os.path.join(FIXTURES, "w4-asym-act-g16-gptq")
    from safetensors.torch import load_file

    ref = load_file(os.path.join(case, "reference.safetensors"))
    imported = AutoModelForCausalLM.from_pretrained(case, quantization_config=hfcompress.FromGPTQConfig(),
                                                    dtype=torch.float32)
    assert imported.config.quantization_config.act_order
    with torch.no_grad():  # step 1: the import computes what GPTQModel computed (it ran in fp16)
        assert _relative_error(ref["logits"], imported(ref["input_ids"]).logits) <= 2e-3
    imported.save_pretrained(tmp_path / "ours")
    # step 2: an EoRA adapter against a float model of the same shape (perturbed dequantized weights)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    hfcompress.dequantize_(original)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    calib = torch.randint(0, 32, (8, 16), generator=g)
    peft_model = hfcompress.compensate(base, original, hfcompress.EoRAConfig(rank=4, dataset=calib, n_samples=8,
                                                                             seq_len=16))
    peft_model.save_pretrained(tmp_path / "eora")
    x = ref["input_ids"]
    with torch.no_grad():
        ours = peft_model(x).logits
    # step 3: the export, read by transformers + compressed-tensors, with the same LoRA adapter on top
    export_compressed_tensors(tmp_path / "ours", tmp_path / "ct")
    w = _check_config(tmp_path / "ct")["weights"]
    assert w.actorder == "group" and not w.symmetric and w.group_size == 16
    # compressed-tensors decompresses on the first forward; PEFT then wraps the dense layers.
    # (transformers' dequantize=True load path drops weight_g_idx, so it is not used for act-order.)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        dense(x)
    theirs = PeftModel.from_pretrained(dense, tmp_path / "eora")
    with torch.no_grad():
        assert _relative_error(ours, theirs(x).logits) <= 1e-3
        assert _relative_error(ours, imported(x).logits) > 1e-2  # the adapter is really applied


def test_cli_export_keeps_a_users_card(tmp_path):
    from hfcompress.cli.main import main

    hfcompress.quantize_(llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32, zero_point="int")).save_pretrained(tmp_path / "q")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "README.md").write_text("my notes\n")
    assert main(["export", str(tmp_path / "q"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "ORIGINAL_README.md").read_text() == "my notes\n"
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "compressed-tensors" in card and "ORIGINAL_README.md" in card
    assert json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_ragged_groups_are_refused_by_layer(tmp_path):
    # hidden 96 with group 64: every layer reading the hidden state has a ragged last group
    hfcompress.quantize_(llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=64, zero_point="int")).save_pretrained(tmp_path / "q")
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.\w+\.\w+_proj: in_features=(96|160) is not a multiple "
                                              r"of group_size=64"):
        export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()  # nothing half-written


def test_uneven_act_order_groups_are_refused_by_tensor():
    spec = IntGroupSpec(bits=4, group_size=16, sym=True, act_order=True)
    g_idx = torch.arange(32, dtype=torch.int32) // 16
    g_idx[0] = 1  # group 0 has 15 columns, group 1 has 17
    tensors = {"weight": torch.zeros(8, 4, dtype=torch.int32), "weight_scale": torch.ones(8, 2).half(),
               "weight_g_idx": g_idx}
    with pytest.raises(ConversionError, match=r"layer\.weight_g_idx: groups of 15 to 17 columns"):
        convert_layer(tensors, spec, 32, 8, where="layer")


def test_three_bit_is_refused(tmp_path, capsys):
    from hfcompress.cli.main import main as cli

    model = hfcompress.quantize_(llama_gqa(0), hfcompress.RTNConfig(bits=3, group_size=32, zero_point="int"))
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(ConversionError, match=r"quantization_config\.bits=3: compressed-tensors' 3-bit packing"):
        export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    # the CLI: one line naming the file, the field, the reason and what to export instead; exit 2
    assert cli(["export", str(tmp_path / "q"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hfcompress export: error: ")
    assert all(w in err[0] for w in (str(tmp_path / "q" / "config.json"), "quantization_config.bits=3",
                                     "differs between its releases", "export 2-, 4- or 8-bit models"))
    # a model in memory is named by its name, not by the scratch folder it was saved to
    with pytest.raises(ConversionError, match=r"^the config of .*: quantization_config\.bits=3") as e:
        export_compressed_tensors(model, tmp_path / "ct")
    assert "scratch" not in str(e.value)
    assert not (tmp_path / "ct").exists()


def test_export_into_its_own_source_is_refused(tmp_path):
    src = tmp_path / "q"
    hfcompress.quantize_(llama_gqa(0), hfcompress.RTNConfig(bits=4, group_size=32, zero_point="int")).save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ConversionError, match=r"is the source checkpoint itself"):
        export_compressed_tensors(src, str(src) + "/")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_a_float_or_foreign_checkpoint_is_refused(tmp_path):
    llama_gqa(0).save_pretrained(tmp_path / "float")
    with pytest.raises(ConversionError, match=r"config\.json: quantization_config is None"):
        export_compressed_tensors(tmp_path / "float", tmp_path / "ct")
