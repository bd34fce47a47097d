"""``target_modules="all-linear"`` on an hfcompress-quantized base: PEFT's shorthand finds the
QuantLinear layers (as it finds bitsandbytes layers), for LoRA and for our own PEFT methods."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import gpt2, inputs, llama_gqa

import hfcompress
from hfcompress.nn import QuantLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized(model_fn=llama_gqa, **kw):
    return hfcompress.quantize_(model_fn(), hfcompress.RTNConfig(bits=4, group_size=32, **kw))


def _adapted(peft_model, layer_type) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, layer_type)}


def test_all_linear_lora_on_quantized_base():
    from hfcompress.integrations.peft import LoraQuantLinear

    model = _quantized()
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 7 * model.config.num_hidden_layers
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert _adapted(peft_model, LoraQuantLinear) == quantized  # every quantized projection, lm_head left alone
    assert "lm_head" not in str(peft_model.peft_config["default"].target_modules)
    ids = inputs()
    with torch.no_grad():
        out = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    assert not torch.allclose(out, base)  # the adapters are in the forward
    peft_model(ids).logits.float().logsumexp(-1).mean().backward()
    grads = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_all_linear_matches_bitsandbytes_convention_on_gpt2_conv1d():
    """GPT-2's Conv1D projections become QuantLinear; the shorthand finds them too, and a float
    model gets the same set of names it gets without hfcompress in the picture."""
    from hfcompress.integrations.peft import LoraQuantLinear

    float_targets = get_peft_model(gpt2(), LoraConfig(r=2, target_modules="all-linear")).peft_config[
        "default"].target_modules
    peft_model = get_peft_model(_quantized(gpt2), LoraConfig(r=2, target_modules="all-linear"))
    assert _adapted(peft_model, LoraQuantLinear) == set(float_targets)


@pytest.mark.parametrize("method", ["mos", "l4q", "compacter"])
def test_all_linear_our_peft_methods_on_quantized_base(method):
    model = _quantized(**({"zero_point": "int"} if method == "l4q" else {}))  # L4Q learns integer zeros
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if method == "mos":
        cfg = hfcompress.MoSConfig(r=4, lora_alpha=8, shards_per_vector=2, target_modules="all-linear")
        from hfcompress.adapters.mos.layer import MoSLayer as layer_type
    elif method == "l4q":
        cfg = hfcompress.L4QConfig(bits=4, group_size=32, r=4, lora_alpha=8, target_modules="all-linear")
        from hfcompress.adapters.l4q.layer import L4QLayer as layer_type
    else:
        cfg = hfcompress.CompacterConfig(n=2, reduction_factor=4, rank=1, target_modules="all-linear")
        from hfcompress.adapters.compacter.layer import CompacterLayer as layer_type
    torch.manual_seed(0)
    peft_model = get_peft_model(model, cfg)
    assert _adapted(peft_model, layer_type) == quantized
    with torch.no_grad():
        assert torch.isfinite(peft_model(inputs()).logits).all()
