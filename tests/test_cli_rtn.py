"""The console script: quantize (RTN) and inspect, as a person would run them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import inputs, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.cli.main import main
from hfcompress.formats import IntGroupSpec


def test_cli_quantize_rtn_then_inspect(tmp_path, capsys):
    llama_gqa().save_pretrained(tmp_path / "f")
    rc = main(["quantize", str(tmp_path / "f"), "--method", "rtn", "--bits", "3", "--group-size", "32",
               "--out", str(tmp_path / "q")])
    assert rc == 0
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    expect = hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(tmp_path / "f"),
                                  hfcompress.RTNConfig(bits=3, group_size=32))
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, expect(ids).logits)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "format: int_group v1" in out and "algorithm: rtn" in out and "bits: 3" in out
    # per-layer bits/weight = the format's own count: q_proj is 96 -> 96
    bpw = IntGroupSpec(bits=3, group_size=32).bits_per_weight(96, 96)
    line = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.self_attn.q_proj"))
    assert line.split()[1:] == ["96", "96", f"{bpw:.3f}"]
    assert "kept in float: ['lm_head']" in out


def test_cli_rtn_bad_input_is_a_clear_error(tmp_path, capsys):
    llama_gqa().save_pretrained(tmp_path / "f")
    rc = main(["quantize", str(tmp_path / "f"), "--bits", "5", "--out", str(tmp_path / "q")])
    assert rc == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_cli_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "hfcompress.cli.main", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("quantize", "inspect"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("argv", [["quantize", "--help"], ["inspect", "--help"]])
def test_cli_rtn_help(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
