"""Export a trained MoS adapter as a standard PEFT LoRA adapter (loads with vanilla peft, no hfcompress)."""

from __future__ import annotations

import os

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .layer import MoSLayer

_PEFT_ROOT = "base_model.model."


@torch.no_grad()
def to_lora(peft_model, out_dir: str, adapter_name: str | None = None) -> LoraConfig:
    """Write ``adapter_config.json`` (peft_type LORA) + ``adapter_model.safetensors`` to ``out_dir``:
    each MoS layer's materialised ``A`` [r, in] / ``B`` [out, r] become ``lora_A`` / ``lora_B`` with
    the same ``r`` and ``lora_alpha``, so LoRA computes exactly ``B A * lora_alpha / r``. Returns the
    LoraConfig."""
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"to_lora: adapter {name!r} not found; available: {sorted(peft_model.peft_config)}")
    cfg = peft_model.peft_config[name]
    if cfg.peft_type != "MOS":
        raise ValueError(f"to_lora: adapter {name!r} is {cfg.peft_type}, not a MoS adapter")
    tensors, targets, conv1d = {}, [], []
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, MoSLayer) or name not in module.mos_index_A:
            continue
        if module.merged and name in module.merged_adapters:
            raise ValueError(f"to_lora: adapter {name!r} is merged into {module_name}; unmerge it first")
        path = module_name.removeprefix(_PEFT_ROOT)
        targets.append(path)
        conv1d.append(type(module.get_base_layer()).__name__ == "Conv1D")
        tensors[f"{_PEFT_ROOT}{path}.lora_A.weight"] = module.lora_A(name).detach().contiguous().clone()
        tensors[f"{_PEFT_ROOT}{path}.lora_B.weight"] = module.lora_B(name).detach().contiguous().clone()
    if not targets:
        raise ValueError(f"to_lora: no MoS layers hold adapter {name!r}")
    if any(conv1d) and not all(conv1d):
        raise ValueError("to_lora: the adapter mixes Conv1D and Linear targets; LoRA's fan_in_fan_out is one flag "
                         "per adapter. Export Conv1D and Linear targets as separate MoS adapters.")
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      fan_in_fan_out=all(conv1d), bias="none", task_type=cfg.task_type,
                      base_model_name_or_path=cfg.base_model_name_or_path, modules_to_save=cfg.modules_to_save)
    from ...hub import atomic_save

    def write(tmp):  # out_dir is replaced whole (an older adapter there is never half-overwritten)
        lora.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})

    atomic_save(out_dir, write)
    return lora
