"""LoRAPrune: importance, GQA-aware groups, cubic schedule, the Trainer callback, the magnitude
baseline, and the export of a physically smaller model that reloads with from_pretrained.

Every test id contains "loraprune" so ``pytest -k loraprune`` selects them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, gpt2, inputs, sqnr_db
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import hfcompress
from hfcompress import prune
from hfcompress.prune.groups import StructuredMasks, attention_group_sums, mlp_channel_sums
from hfcompress.prune.importance import lora_importance, lora_merged_grad, normalise


# -- tiny GQA models with enough blocks to keep the first and last one ------------------------------
def llama4(seed=0):
    torch.manual_seed(seed)  # 3 key/value heads, 2 query heads each, head_dim 16
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def qwen2_3(seed=0):
    torch.manual_seed(seed)  # q/k/v biases, tied embeddings
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def mistral3(seed=0):
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return MistralForCausalLM(cfg).eval()


ARCHS = {"llama": llama4, "qwen2": qwen2_3, "mistral": mistral3}


def _randomize_biases_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)


def _lora(model, r=4):
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        self.x = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


# -- importance -----------------------------------------------------------------------------------
def test_loraprune_merged_grad_is_the_merged_weight_step():
    """Ĝ is exactly the change of the merged weight B·A under one unit step of A and B."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 11, generator=g), torch.randn(7, 3, generator=g)
    ga, gb = torch.randn(3, 11, generator=g), torch.randn(7, 3, generator=g)
    step = b @ a - (b - gb) @ (a - ga)
    torch.testing.assert_close(lora_merged_grad(a, b, ga, gb), step)


def test_loraprune_importance_uses_lora_gradients_of_a_real_layer():
    lin = torch.nn.Linear(12, 8)
    model = get_peft_model(torch.nn.Sequential(lin), LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(5, 12)
    model(x).pow(2).sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    imp = lora_importance(layer.get_base_layer().weight, a, b, a.grad, b.grad, layer.scaling["default"])
    merged = layer.get_base_layer().weight + layer.scaling["default"] * b @ a
    ghat = b.grad @ a + b @ a.grad - b.grad @ a.grad
    torch.testing.assert_close(imp, (ghat * merged).abs().detach())
    assert imp.shape == (8, 12) and imp.sum() > 0


# -- groups -----------------------------------------------------------------------------------------
def test_loraprune_group_sums_follow_gqa_layout():
    """Group g owns q rows / o cols of query heads g*R..(g+1)*R-1 and k/v rows of head g."""
    model = llama4()
    block = prune.decoder_blocks(model)[1]
    hd, r = block.head_dim, block.q_per_kv
    assert (block.n_kv, r, hd) == (3, 2, 16)
    g = torch.Generator().manual_seed(0)
    s = {n: torch.rand(tuple(getattr(block.attn, n).weight.shape), generator=g) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    got = attention_group_sums(block, s)
    for grp in range(3):
        q = s["q_proj"][grp * r * hd:(grp + 1) * r * hd].sum()
        kv = s["k_proj"][grp * hd:(grp + 1) * hd].sum() + s["v_proj"][grp * hd:(grp + 1) * hd].sum()
        o = s["o_proj"][:, grp * r * hd:(grp + 1) * r * hd].sum()
        torch.testing.assert_close(got[grp], q + kv + o)
    m = {n: torch.rand(tuple(getattr(block.mlp, n).weight.shape), generator=g) for n in ("gate_proj", "up_proj", "down_proj")}
    torch.testing.assert_close(mlp_channel_sums(block, m), m["gate_proj"].sum(1) + m["up_proj"].sum(1) + m["down_proj"].sum(0))


def test_loraprune_masks_prune_lowest_and_are_monotone():
    model = llama4()
    masks = StructuredMasks(model, keep_first_layers=1, keep_last_layers=1)
    assert masks.prunable == [1, 2]
    attn = {1: torch.tensor([3.0, 1.0, 2.0]), 2: torch.tensor([0.5, 2.0, 1.0])}
    mlp = {i: torch.arange(160, 0, -1, dtype=torch.float32) for i in (1, 2)}  # channel c scores 160 - c
    masks.prune_to_(0.3, attn, mlp)  # round(0.9) = 1 group, round(48) = 48 channels
    assert masks.attn_keep[1].tolist() == [True, False, True]
    assert masks.attn_keep[2].tolist() == [False, True, True]
    assert int((~masks.mlp_keep[1]).sum()) == 48 and not masks.mlp_keep[1][-48:].any()
    # new scores now favour a pruned group: it stays pruned, the next lowest kept one goes
    masks.prune_to_(0.6, {1: torch.tensor([0.1, 9.0, 0.2]), 2: attn[2]}, mlp)
    assert masks.attn_keep[1].tolist() == [False, False, True]
    # never below one group / channel
    masks.prune_to_(0.999, attn, mlp)
    assert int(masks.attn_keep[1].sum()) == 1 and int(masks.mlp_keep[1].sum()) == 1


def test_loraprune_refuses_other_architectures():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        StructuredMasks(gpt2())
    with pytest.raises(ValueError, match="leaves no block to prune"):
        StructuredMasks(llama4(), keep_first_layers=2, keep_last_layers=2)


# -- schedule ---------------------------------------------------------------------------------------
def test_loraprune_cubic_schedule():
    s = [prune.cubic_sparsity(t, 100, 0.5, warmup_steps=10, cooldown_steps=20) for t in range(101)]
    assert s[:10] == [0.0] * 10 and s[10] == 0.0
    assert all(v == 0.5 for v in s[80:])
    assert all(b >= a for a, b in zip(s, s[1:]))
    # cubic: half-way through the pruning window, 1 - 0.5**3 of the target
    assert s[45] == pytest.approx(0.5 * (1 - 0.5 ** 3))
    with pytest.raises(ValueError, match="leave no pruning steps"):
        prune.cubic_sparsity(0, 10, 0.5, warmup_steps=6, cooldown_steps=4)


# -- the callback inside a real Trainer --------------------------------------------------------------
def _train(pm, cb, steps=12, tmp_path=None):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1000)
    Trainer(model=pm, args=args, train_dataset=_Tokens(), callbacks=[cb]).train()


def test_loraprune_callback_in_trainer_then_export_reload(tmp_path):
    pm = _lora(llama4())
    cb = hfcompress.LoRAPruneCallback(target_sparsity=0.5, warmup_steps=2, cooldown_steps=2, prune_every=2)
    _train(pm, cb, tmp_path=tmp_path)
    # schedule followed: pruned progressively, reaching the target at max_steps - cooldown
    steps = [s for s, _ in cb.history]
    assert steps[-1] == 10 and cb.history[-1][1] == 0.5 and len(cb.history) >= 3
    assert [s for _, s in cb.history] == sorted(s for _, s in cb.history)
    masks = cb.masks
    for i in (1, 2):
        assert int(masks.attn_keep[i].sum()) == 1 and int(masks.mlp_keep[i].sum()) == 80
        assert cb.ema.avg[2 * i].sum() > 0 and cb.ema.avg[2 * i + 1].sum() > 0
    # masks are applied: removing the hooks changes the output
    pm.eval()
    x = inputs()
    with torch.no_grad():
        masked = pm(x).logits
        masks.remove_()
        unmasked = pm(x).logits
        masks.install_(pm)
    assert not torch.allclose(masked, unmasked, atol=1e-3)

    out = tmp_path / "pruned"
    small = prune.export(pm, str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(reloaded).__name__ == "PrunedLlamaForCausalLM" and isinstance(reloaded, LlamaForCausalLM)
    with torch.no_grad():
        got = reloaded(x).logits
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small(x).logits.detach(), got)
    attn = reloaded.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (32, 96) and attn.k_proj.weight.shape == (16, 96)
    assert reloaded.model.layers[2].mlp.down_proj.weight.shape == (96, 80)
    assert reloaded.model.layers[0].mlp.down_proj.weight.shape == (96, 160)  # kept block
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hfcompress_pruned_llama"
    assert config[prune.PRUNING_KEY]["method"] == "loraprune"
    assert set(config[prune.PRUNING_KEY]["layers"]) == {"1", "2"}
    card = (out / "README.md").read_text()
    assert "loraprune" in card and "| 1 | 2/6 | 1/3 | 80/160 |" in card
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data
    assert meta.pipeline_tag == "text-generation" and meta.base_model_relation == "finetune"
    n_small = sum(p.numel() for p in reloaded.parameters())
    assert n_small < sum(p.numel() for p in llama4().parameters())
    # generation works with the per-block head counts (KV cache)
    assert reloaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_loraprune_callback_importance_matches_brute_force(tmp_path):
    """One backward pass: the callback's per-group score is the normalised sum, over the group's
    rows/columns of every LoRA projection, of |Ĝ ⊙ (W + s·B·A)|."""
    pm = _lora(llama4())
    cb = hfcompress.LoRAPruneCallback(target_sparsity=0.5, ema=0.0)

    class _State:
        max_steps = 10

    cb.on_train_begin(None, _State(), None, model=pm)
    pm(input_ids=inputs(), labels=inputs()).loss.backward()
    cb.accumulate_()
    block = cb.masks.blocks[2]
    hd, r = block.head_dim, block.q_per_kv
    per = {}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        m = block.module(n)
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        per[n] = lora_importance(m.get_base_layer().weight, a, b, a.grad, b.grad, m.scaling["default"])
    brute = torch.stack([per["q_proj"][g * r * hd:(g + 1) * r * hd].sum() + per["k_proj"][g * hd:(g + 1) * hd].sum()
                         + per["v_proj"][g * hd:(g + 1) * hd].sum() + per["o_proj"][:, g * r * hd:(g + 1) * r * hd].sum()
                         for g in range(3)])
    torch.testing.assert_close(cb.ema.avg[4], normalise(brute))


def test_loraprune_callback_needs_lora_on_every_group_kind(tmp_path):
    pm = get_peft_model(llama4(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    cb = hfcompress.LoRAPruneCallback(target_sparsity=0.5)
    with pytest.raises(ValueError, match=r"model.layers.1 has no LoRA on any MLP projection"):
        _train(pm, cb, steps=2, tmp_path=tmp_path)
    with pytest.raises(ValueError, match="target_sparsity"):
        hfcompress.LoRAPruneCallback(target_sparsity=1.5)


# -- export: every supported architecture, magnitude baseline ----------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loraprune_magnitude_export_reload(arch, tmp_path):
    model = ARCHS[arch]()
    _randomize_biases_(model)
    pm = _lora(model)  # non-zero LoRA: export must merge it
    masks = prune.magnitude_structured(pm, 0.5, keep_first_layers=1, keep_last_layers=0)
    block = masks.blocks[1]
    # the dropped groups are the ones with the smallest L1 norm
    w = {n: block.module(n).get_base_layer().weight.abs() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    l1 = attention_group_sums(block, w)
    dropped = (~masks.attn_keep[1]).nonzero().flatten()
    assert set(dropped.tolist()) == set(torch.topk(l1, len(dropped), largest=False).indices.tolist())
    x = inputs()
    with torch.no_grad():
        ref = pm(x).logits
    prune.export(pm, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(reloaded).__name__.startswith("Pruned")
    with torch.no_grad():
        got = reloaded(x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "config.json").read_text())[prune.PRUNING_KEY]["method"] == "magnitude"


# -- composition with quantization -----------------------------------------------------------------
def test_loraprune_pruned_model_quantizes_and_reloads(tmp_path):
    model = llama4()
    prune.magnitude_structured(model, 0.5)
    pruned_dir, q_dir = tmp_path / "pruned", tmp_path / "q"
    prune.export(model, str(pruned_dir))
    pruned = AutoModelForCausalLM.from_pretrained(str(pruned_dir))
    x = inputs()
    # quantize on load from the pruned checkpoint
    qcfg = hfcompress.RTNConfig(bits=4, group_size=16)
    q = AutoModelForCausalLM.from_pretrained(str(pruned_dir), quantization_config=qcfg)
    layer = q.model.layers[1].mlp.down_proj
    assert isinstance(layer, hfcompress.QuantLinear) and (layer.in_features, layer.out_features) == (80, 96)
    # same as quantizing the loaded pruned model in memory
    q_mem = hfcompress.quantize_(AutoModelForCausalLM.from_pretrained(str(pruned_dir)),
                                 hfcompress.RTNConfig(bits=4, group_size=16))
    with torch.no_grad():
        lq, lmem, lf = q(x).logits, q_mem(x).logits, pruned(x).logits
    torch.testing.assert_close(lq, lmem)
    assert 10.0 < sqnr_db(lf, lq) < 80.0  # quantized for real, still close to the pruned float model
    q.save_pretrained(str(q_dir))
    config = json.loads((q_dir / "config.json").read_text())
    assert config["quantization_config"]["algorithm"] == "rtn" and prune.PRUNING_KEY in config
    back = AutoModelForCausalLM.from_pretrained(str(q_dir))
    assert isinstance(back.model.layers[1].self_attn.q_proj, hfcompress.QuantLinear)
    assert back.model.layers[1].self_attn.q_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, lq)


# -- loading rules ----------------------------------------------------------------------------------
def test_loraprune_reload_without_import_fails_loudly(tmp_path):
    model = llama4()
    prune.magnitude_structured(model, 0.5)
    prune.export(model, str(tmp_path))
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "hfcompress_pruned_llama" in res.stderr


def test_loraprune_bad_pruned_config_is_named(tmp_path):
    model = llama4()
    prune.magnitude_structured(model, 0.5)
    prune.export(model, str(tmp_path))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config[prune.PRUNING_KEY]["layers"]["1"]["num_attention_heads"] = 3  # not a whole GQA group
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hfcompress_pruning.layers\['1'\].*whole GQA groups"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_loraprune_export_without_masks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="carries no pruning masks"):
        prune.export(llama4(), str(tmp_path))


def test_loraprune_pruned_model_gptq_save_reload(tmp_path):
    model = llama4()
    prune.magnitude_structured(model, 0.5)
    prune.export(model, str(tmp_path / "pruned"))
    pruned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    x = inputs()
    with torch.no_grad():
        ref = pruned(x).logits
    q = hfcompress.quantize_(pruned, hfcompress.GPTQConfig(bits=4, group_size=16), batches=[inputs(4, 32, seed=3)])
    assert q.model.layers[2].mlp.down_proj.in_features == 80
    with torch.no_grad():
        lq = q(x).logits
    assert 10.0 < sqnr_db(ref, lq) < 80.0
    q.save_pretrained(str(tmp_path / "gptq"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gptq"))
    assert type(back).__name__ == "PrunedLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, lq)
