"""Exporting a trained L4Q model: the int_group checkpoint it trained to be."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from torch import nn

from ...api import AFTER_QUANTIZE_HOOKS
from ...modules import set_submodule
from .layer import L4QLayer
from .model import export_quant_config

_ATTACHED = ("hf_quantizer", "quantization_method")


def _base_model(model: nn.Module) -> nn.Module:
    """The host model under a ``PeftModel`` (``.base_model.model``), or ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def l4q_layers(model: nn.Module) -> list[tuple[str, L4QLayer]]:
    """``(name, layer)`` of every L4Q layer, names relative to the host model."""
    return [(k, m) for k, m in _base_model(model).named_modules() if isinstance(m, L4QLayer)]


@contextlib.contextmanager
def quantized_model_(peft_model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[nn.Module]:
    """Inside the block, the host model has every L4Q layer replaced by its packed QuantLinear
    and the hfcompress quantization config attached (``save_pretrained`` writes a normal
    hfcompress checkpoint); on exit the L4Q layers are put back and training can go on."""
    model = _base_model(peft_model)
    layers = l4q_layers(model)
    if not layers:
        raise ValueError("no L4Q layers found: build the model with peft.get_peft_model(model, hfcompress.L4QConfig(...))")
    from peft.tuners.tuners_utils import BaseTunerLayer

    config_map = getattr(peft_model, "peft_config", None) or {}
    swapped: list[tuple[str, nn.Module]] = []
    saved_attrs = {a: getattr(model, a) for a in _ATTACHED if hasattr(model, a)}
    host_config = getattr(model, "config", None)
    saved_cfg = {a: getattr(host_config, a) for a in ("quantization_config", "_is_quantized")
                 if host_config is not None and hasattr(host_config, a)}
    try:
        adapter = None
        for key, layer in layers:
            adapter = adapter_name or layer._l4q_active()
            if adapter is None:
                raise ValueError(f"{key}: no active L4Q adapter; pass adapter_name= or call set_adapter(name)")
            if layer.merged:
                raise ValueError(f"{key}: the adapter is merged into the float weight; unmerge_adapter() first")
            q = layer.to_quant_linear(adapter)
            set_submodule(model, key, q)
            swapped.append((key, layer))
        others = [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        if others:
            raise ValueError(f"cannot export an L4Q model that also holds other PEFT layers ({others[:3]} ...): "
                             "merge or remove them first")
        config = config_map.get(adapter)
        if config is None:
            raise ValueError(f"no L4QConfig for adapter {adapter!r} (peft_config has {sorted(config_map)})")
        quant_config = export_quant_config(model, config)
        for hook in AFTER_QUANTIZE_HOOKS:
            hook(model, quant_config)
        yield model
    finally:
        for key, layer in swapped:
            set_submodule(model, key, layer)
        for a in _ATTACHED:
            if a in saved_attrs:
                setattr(model, a, saved_attrs[a])
            elif hasattr(model, a):
                delattr(model, a)
        if host_config is not None:
            for a in ("quantization_config", "_is_quantized"):
                if a in saved_cfg:
                    setattr(host_config, a, saved_cfg[a])
                elif hasattr(host_config, a):
                    delattr(host_config, a)


def export(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_name: Optional[str] = None,
           **save_kwargs) -> str:
    """Write the trained L4Q model as an hfcompress int_group checkpoint (safetensors + config.json,
    no LoRA branch) to ``out_dir``; ``from_pretrained(out_dir)`` (after ``import hfcompress``) loads it
    into QuantLinear layers whose logits equal the trained model's forward. The PEFT model is
    left as it was. Returns ``out_dir``."""
    with quantized_model_(peft_model, adapter_name) as model:
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"export needs a transformers model (with save_pretrained), got {type(model).__name__}")
        model.save_pretrained(out_dir, **save_kwargs)
    return str(out_dir)


def optimizer_groups(model: nn.Module, lr: float, quantizer_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for an L4Q model: LoRA factors at ``lr`` (with ``weight_decay``),
    learned step sizes and offsets at ``quantizer_lr`` without decay. Adam-style optimizers move
    every parameter by about ``lr`` per step whatever its gradient scale, so the quantizer,
    whose steps are ~1e-2, needs a learning rate of its own (~1e-5)."""
    quantizer, lora = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (quantizer if ("l4q_step" in name or "l4q_zero" in name) else lora).append(p)
    if not quantizer:
        raise ValueError("optimizer_groups: no trainable L4Q step sizes found; build the model with "
                         "peft.get_peft_model(model, hfcompress.L4QConfig(...))")
    return [{"params": lora, "lr": lr, "weight_decay": weight_decay},
            {"params": quantizer, "lr": quantizer_lr, "weight_decay": 0.0}]

