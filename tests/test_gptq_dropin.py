"""Drop-in arguments of transformers' own GPTQConfig: ``tokenizer=`` (object, directory or Hub id),
``dataset=`` as a list of strings, a text file, a ``datasets.Dataset``-like table with a text
column, or a named set (loaded through ``datasets`` when it can be; a clear error when not);
and ``--tokenizer`` on the CLI commands that calibrate."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.config import ConfigError

TEXT = ["Now is the winter of our discontent made glorious summer by this sun of York. " * 4,
        "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried. " * 4]
SMALL = dict(bits=4, group_size=32, n_samples=4, seq_len=32)


@pytest.fixture()
def float_dir(tmp_path):
    """A tiny float checkpoint saved WITHOUT a tokenizer (the case users hit)."""
    llama_gqa().save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _tensors(d):
    return load_file(str(next(d.glob("*.safetensors"))))


def _quantized_with(float_dir, out, **cfg):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=hfcompress.GPTQConfig(**SMALL, **cfg))
    model.save_pretrained(out)
    return _tensors(out)


def test_tokenizer_object_path_and_explicit_argument_agree(float_dir, tmp_path):
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    ref = hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(float_dir), hfcompress.GPTQConfig(
        **SMALL, dataset=TEXT), tokenizer=tok)
    ref.save_pretrained(tmp_path / "ref")
    expect = _tensors(tmp_path / "ref")
    by_object = _quantized_with(float_dir, tmp_path / "a", tokenizer=tok, dataset=TEXT)
    by_path = _quantized_with(float_dir, tmp_path / "b", tokenizer=str(tmp_path / "tok"), dataset=TEXT)
    assert sorted(by_object) == sorted(expect) == sorted(by_path)
    assert all(torch.equal(expect[k], by_object[k]) and torch.equal(expect[k], by_path[k]) for k in expect)
    # the tokenizer is an argument, not part of the checkpoint's config
    q = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "tokenizer" not in q and q["algorithm"] == "gptq"
    # a different text gives different integers: the dataset really is what calibrates
    other = _quantized_with(float_dir, tmp_path / "c", tokenizer=tok, dataset=[TEXT[0][::-1] * 2])
    assert any(not torch.equal(expect[k], other[k]) for k in expect if k.endswith(".weight"))


def test_dataset_file_list_and_table_give_the_same_checkpoint(float_dir, tmp_path):
    tok = char_tokenizer()
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(TEXT))

    class Table:  # the part of datasets.Dataset the calibration reads: column_names and a column by name
        column_names = ["id", "text"]

        def __getitem__(self, key):
            return {"id": [0, 1], "text": list(TEXT)}[key]

    from_list = _quantized_with(float_dir, tmp_path / "l", tokenizer=tok, dataset=list(TEXT))
    from_file = _quantized_with(float_dir, tmp_path / "f", tokenizer=tok, dataset=str(path))
    from_table = _quantized_with(float_dir, tmp_path / "t", tokenizer=tok, dataset=Table())
    assert all(torch.equal(from_list[k], from_file[k]) and torch.equal(from_list[k], from_table[k]) for k in from_list)


def test_named_dataset_loads_through_datasets_or_says_why(monkeypatch):
    from hfcompress.calibration.data import load_texts

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "allenai/c4":
            raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")
        return {"text": ["first line", "", "second line"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_texts("wikitext2") == ["first line", "second line"]  # empty rows dropped, as optimum does
    assert calls[0] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    with pytest.raises(ValueError, match=r"'c4' could not be loaded.*Couldn't reach 'allenai/c4'.*text file"):
        load_texts("c4")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"'wikitext2'.*`datasets` library.*not installed.*pip install datasets"):
        load_texts("wikitext2")
    with pytest.raises(FileNotFoundError, match="neither a text file.*named set"):
        load_texts("no-such-set")


def test_missing_tokenizer_says_to_pass_one(float_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=hfcompress.GPTQConfig(**SMALL))
    msg = str(e.value)
    assert "has none" in msg and "GPTQConfig(tokenizer=...)" in msg and "sentencepiece" not in msg.lower()
    with pytest.raises(ConfigError, match="tokenizer='.*nowhere' does not load a tokenizer"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=hfcompress.GPTQConfig(
            **SMALL, tokenizer=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="tokenizer must be a tokenizer"):
        hfcompress.GPTQConfig(tokenizer=42)
    with pytest.raises(ConfigError, match="desc_act -> act_order"):
        hfcompress.GPTQConfig(desc_act=True)


def test_cli_tokenizer_option(float_dir, tmp_path, capsys):
    from hfcompress.cli.main import main

    char_tokenizer().save_pretrained(tmp_path / "tok")
    args = ["quantize", str(float_dir), "--method", "gptq", "--group-size", "32", "--n-samples", "4",
            "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "no-tok")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no tokenizer; pass --tokenizer" in err
    assert main([*args, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tokenizer.json").is_file()  # saved beside the checkpoint for the next command
    assert main([*args, "--tokenizer", str(tmp_path / "tok"), "--stream", "--out", str(tmp_path / "qs")]) == 0
    a, b = _tensors(tmp_path / "q"), load_file(str(tmp_path / "qs" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--max-tokens", "64", "--window", "32", "--stride", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(float_dir), "--max-tokens", "64"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["eval", str(float_dir), "--tokenizer", str(tmp_path / "tok"), "--max-tokens", "64", "--window", "32",
                 "--stride", "16"]) == 0
