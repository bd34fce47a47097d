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
    assert "zero_point: float" in out  # RTNConfig's default, which the CLI follows
    # per-layer bits/weight = the format's own count: q_proj is 96 -> 96
    bpw = IntGroupSpec(bits=3, group_size=32, zero_point="float").bits_per_weight(96, 96)
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


def test_cli_quantize_options_follow_the_config_defaults():
    """No --zero-point / --static-groups: the config's own defaults (float zeros; static groups for
    GPTQ); each can be turned off; GPTQ-only flags are refused for RTN by name."""
    from hfcompress.cli.main import build_parser
    from hfcompress.cli.quantize import make_config

    def config(*argv):
        return make_config(build_parser().parse_args(["quantize", "m", "--out", "o", *argv]))

    gptq = config("--method", "gptq")
    assert (gptq.zero_point, gptq.static_groups, gptq.act_order) == ("float", True, True)
    assert gptq == hfcompress.GPTQConfig(bits=4, group_size=128)
    off = config("--method", "gptq", "--zero-point", "int", "--no-static-groups")
    assert (off.zero_point, off.static_groups, off.spec.act_order) == ("int", False, True)
    assert config("--method", "rtn").zero_point == "float" and config("--zero-point", "int").zero_point == "int"
    assert config("--method", "rtn", "--sym").zero_point == "int"  # symmetric grids store no zero points
    for flag in ("--static-groups", "--no-static-groups"):
        with pytest.raises(ValueError, match=f"{flag} only apply to --method gptq"):
            config("--method", "rtn", flag)
