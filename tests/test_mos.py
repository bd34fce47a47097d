"""MoS (Mixture of Shards): shard assembly, the four differentiation strategies, seeded index sets
saved with the adapter, merge/unmerge, export to a LoRA that vanilla peft loads, and PEFT's
common checks."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hfcompress
from hfcompress.adapters.mos import MoSConfig, MoSLinear, to_lora
from peft_method_checks import (
    REPO_TESTS,
    check_fresh_process_reload,
    check_grads_only_on_adapter,
    check_nonidentity_and_disable,
    check_save_load,
    check_two_adapters,
    logits,
    check_trainer,
    train_steps,
)
from tiny_models import BUILDERS, inputs

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value", "dense"],
}
MODELS = list(TARGETS)


def cfg(model_name, **kw):
    kw = {"r": 4, "shards_per_vector": 2, "private_rank": 1, "pool_ratio": 0.5, "init_weights": False,
          "target_modules": TARGETS[model_name], **kw}
    return lambda: MoSConfig(**kw)


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MoSLinear)}


def test_mos_assembly_matches_definition():
    model = get_peft_model(BUILDERS["llama"](), cfg("llama")())
    for name, m in layers(model).items():
        pool_a = m.mos_pool_A["default"][str(m.in_features)]
        pool_b = m.mos_pool_B["default"][str(m.out_features)]
        idx_a, idx_b = m.mos_index_A["default"], m.mos_index_B["default"]
        rows = [torch.cat([pool_a[i] for i in idx_a[j]]) for j in range(idx_a.shape[0])]
        cols = [torch.cat([pool_b[i] for i in idx_b[j]]) for j in range(idx_b.shape[0])]
        a = torch.cat([m.mos_private_A["default"], torch.stack(rows)], 0)  # [r, k]
        b = torch.cat([m.mos_private_B["default"], torch.stack(cols, 1)], 1)  # [m, r]
        assert torch.equal(m.lora_A("default"), a) and torch.equal(m.lora_B("default"), b), name
        x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0))
        want = m.get_base_layer()(x) + x @ a.T @ b.T * (8 / 4)  # lora_alpha / r
        assert torch.allclose(m(x), want, atol=1e-5), name


@pytest.mark.parametrize("model_name", MODELS, ids=[f"mos-{m}" for m in MODELS])
def test_mos_pools_shared_and_parameter_count(model_name):
    config = cfg(model_name)()
    model = get_peft_model(BUILDERS[model_name](), config)
    ls = layers(model)
    pools = model.base_model.mos_pool_A["default"], model.base_model.mos_pool_B["default"]
    # every layer references the tuner's pools (one object), and a pool serves all layers of its length
    assert all(m.mos_pool_A is model.base_model.mos_pool_A for m in ls.values())
    rp, l = config.public_rank, config.shards_per_vector
    for side, pool in zip(("in_features", "out_features"), pools):
        for length, shards in pool.items():
            n_layers = sum(getattr(m, side) == int(length) for m in ls.values())
            assert shards.shape == (max(rp * l, math.ceil(config.pool_ratio * n_layers * rp * l)), int(length) // l)
    expected = sum(p.numel() for pool in pools for p in pool.values()) + sum(
        config.private_rank * (m.in_features + m.out_features) for m in ls.values())
    assert model.get_nb_trainable_parameters()[0] == expected
    lora_equiv = sum(config.r * (m.in_features + m.out_features) for m in ls.values())
    assert expected < lora_equiv  # sharing saves parameters


def test_mos_strategies():
    base = cfg("llama", r=6, shards_per_vector=4, private_rank=2)
    m_sel = layers(get_peft_model(BUILDERS["llama"](), base()))
    idx = [m.mos_index_A["default"] for n, m in m_sel.items() if n.endswith("q_proj")]
    assert idx[0].shape == (4, 4)  # public rank x shards per vector (vector sharding)
    assert not torch.equal(idx[0], idx[1])  # subset selection: each layer its own subset
    assert all(len(set(i.flatten().tolist())) == i.numel() for i in idx)  # no shard twice in one layer
    assert all(m.mos_private_A["default"].shape[0] == 2 for m in m_sel.values())  # shard privatisation
    # pair dissociation: A and B draw independently; off -> B follows A's pattern
    assert any(not torch.equal(m.mos_index_A["default"], m.mos_index_B["default"]) for m in m_sel.values())
    tied = layers(get_peft_model(BUILDERS["llama"](), cfg("llama", pair_dissociation=False)()))
    for m in tied.values():
        n_b = m.mos_pool_B["default"][str(m.out_features)].shape[0]
        assert torch.equal(m.mos_index_B["default"], m.mos_index_A["default"] % n_b)
    plain = layers(get_peft_model(BUILDERS["llama"](), cfg("llama", subset_selection=False)()))
    q = [m.mos_index_A["default"] for n, m in plain.items() if n.endswith("q_proj")]
    assert torch.equal(q[0], q[1])  # without subset selection every layer uses the same shards
    # index sets come from the seed and the layer name: reproducible, and another seed differs
    again = layers(get_peft_model(BUILDERS["llama"](), base()))
    other = layers(get_peft_model(BUILDERS["llama"](), cfg("llama", r=6, shards_per_vector=4, private_rank=2,
                                                               seed=1)()))
    assert all(torch.equal(m.mos_index_A["default"], again[n].mos_index_A["default"]) for n, m in m_sel.items())
    assert any(not torch.equal(m.mos_index_A["default"], other[n].mos_index_A["default"]) for n, m in m_sel.items())


def test_mos_index_sets_saved_and_restored(tmp_path):
    model = get_peft_model(BUILDERS["llama"](), cfg("llama")())
    x = inputs()
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    idx_keys = [k for k in saved if "mos_index_A" in k]
    assert len(idx_keys) == len(layers(model)) and saved[idx_keys[0]].dtype == torch.int64
    assert sorted(k for k in saved if "mos_pool" in k) == sorted(
        f"base_model.mos_pool_{s}.{n}" for s, d in (("A", model.base_model.mos_pool_A), ("B", model.base_model.mos_pool_B))
        for n in d["default"].keys())  # pools saved once
    # tamper with the seed in the saved config: the saved index sets still win
    import json
    cfg_path = tmp_path / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["seed"] = 12345
    cfg_path.write_text(json.dumps(c))
    loaded = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    assert torch.equal(logits(loaded, x), ref)


@pytest.mark.parametrize("model_name", MODELS, ids=[f"mos-{m}" for m in MODELS])
def test_mos_nonidentity_disable_and_grads(model_name):
    check_nonidentity_and_disable(cfg(model_name), BUILDERS[model_name])
    check_grads_only_on_adapter(cfg(model_name), BUILDERS[model_name], "mos_")


def test_mos_identity_init_default():
    model = get_peft_model(BUILDERS["llama"](), MoSConfig(r=4, target_modules=["q_proj", "v_proj"]))
    x = inputs()
    assert torch.equal(logits(model, x), logits(BUILDERS["llama"](), x))  # B = 0, like LoRA


def test_mos_save_load(tmp_path):
    check_save_load(cfg("gpt2"), BUILDERS["gpt2"], tmp_path)


def test_mos_fresh_process_reload(tmp_path):
    check_fresh_process_reload(cfg("llama"), "llama", tmp_path)


def test_mos_two_adapters_switch_delete(tmp_path):
    check_two_adapters(cfg("llama"), cfg("llama", r=2, private_rank=0, seed=3), BUILDERS["llama"], tmp_path)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"], ids=["mos-llama", "mos-gpt2"])
def test_mos_merge_unmerge(model_name):
    model = get_peft_model(BUILDERS[model_name](), cfg(model_name)())
    train_steps(model, steps=2)
    x = inputs()
    ref = logits(model, x)
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in layers(model).items()}
    model.merge_adapter()
    assert torch.allclose(logits(model, x), ref, atol=1e-4)
    assert any(not torch.equal(m.get_base_layer().weight, weights[n]) for n, m in layers(model).items())
    model.unmerge_adapter()
    for n, m in layers(model).items():
        assert torch.allclose(m.get_base_layer().weight, weights[n], atol=1e-6), n
    merged = model.merge_and_unload(safe_merge=True)
    assert not layers(merged)
    assert torch.allclose(logits(merged, x), ref, atol=1e-4)


def test_mos_to_lora_loads_in_vanilla_peft(tmp_path):
    """The export loads in a fresh process with plain peft (hfcompress never imported)."""
    refs = {}
    for name in ("llama", "gpt2"):
        model = get_peft_model(BUILDERS[name](), cfg(name)())
        train_steps(model, steps=2)
        refs[f"{name}"] = logits(model, inputs()).contiguous()
        lora_cfg = to_lora(model, str(tmp_path / name))
        assert lora_cfg.r == 4 and lora_cfg.fan_in_fan_out == (name == "gpt2")
    save_file(refs, str(tmp_path / "ref.safetensors"))
    code = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {REPO_TESTS!r})
        import tiny_models
        from peft import PeftModel
        from safetensors.torch import load_file
        refs = load_file({str(tmp_path / "ref.safetensors")!r})
        for name in ("llama", "gpt2"):
            path = {str(tmp_path)!r} + "/" + name
            assert json.load(open(path + "/adapter_config.json"))["peft_type"] == "LORA"
            m = PeftModel.from_pretrained(tiny_models.BUILDERS[name](), path)
            with torch.no_grad():
                y = m(tiny_models.inputs()).logits
            print(name, "MAXDIFF", float((y - refs[name]).abs().max()))
        print("HFCOMPRESS_IMPORTED", "hfcompress" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HFCOMPRESS_IMPORTED False" in out.stdout
    diffs = [float(line.split("MAXDIFF")[1]) for line in out.stdout.splitlines() if "MAXDIFF" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out.stdout


def test_mos_trainer(tmp_path):
    model = get_peft_model(BUILDERS["llama"](), MoSConfig(r=4, target_modules=TARGETS["llama"]))
    check_trainer(model, "mos_", tmp_path)


def test_mos_on_quantized_base(tmp_path):
    base = hfcompress.quantize_(BUILDERS["llama"](), hfcompress.RTNConfig(bits=4, group_size=32))
    model = get_peft_model(base, cfg("llama")())
    assert all(type(m.get_base_layer()).__name__ == "QuantLinear" for m in layers(model).values())
    losses = train_steps(model, steps=4)
    assert losses[-1] < losses[0]
    x = inputs()
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    base2 = hfcompress.quantize_(BUILDERS["llama"](), hfcompress.RTNConfig(bits=4, group_size=32))
    assert torch.equal(logits(PeftModel.from_pretrained(base2, tmp_path), x), ref)
    with pytest.raises(ValueError, match="float base weight"):
        model.merge_and_unload()


@pytest.mark.parametrize("bad,match", [
    (dict(r=4, private_rank=4), "private_rank"),
    (dict(r=0), "MoSConfig.r"),
    (dict(pool_ratio=0), "pool_ratio"),
    (dict(shards_per_vector=0), "shards_per_vector"),
], ids=["private", "r", "pool", "shards"])
def test_mos_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MoSConfig(target_modules=["q_proj"], **bad)


def test_mos_errors_name_the_module():
    with pytest.raises(ValueError, match=r"v_proj.*not divisible by MoSConfig.shards_per_vector=5"):
        get_peft_model(BUILDERS["llama"](), MoSConfig(r=4, shards_per_vector=5, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="target_modules is required"):
        get_peft_model(BUILDERS["llama"](), MoSConfig(r=4))
