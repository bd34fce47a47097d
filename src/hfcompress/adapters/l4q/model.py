"""L4QModel: the PEFT tuner that swaps target linears for L4Q layers; unloading with merge
swaps in packed QuantLinear layers instead (a normal hfcompress checkpoint)."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...api import AFTER_QUANTIZE_HOOKS
from ...modules import is_linear, set_submodule
from ...nn import QuantLinear
from .config import L4QConfig, L4QQuantConfig
from .layer import L4QLayer, Linear


class L4QModel(BaseTuner):
    """``get_peft_model(model, L4QConfig(...))`` builds this; ``merge_and_unload()`` returns the
    model with every L4Q layer replaced by the QuantLinear it trained (ready for
    ``save_pretrained``: the int_group quantization config is attached)."""

    prefix: str = "l4q_"
    tuner_layer_cls = L4QLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: L4QConfig, adapter_name, target, target_name, parent, current_key):
        try:
            if isinstance(target, L4QLayer):
                target.update_layer(adapter_name, config)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, (nn.Linear, QuantLinear)):
                raise TypeError(f"L4Q targets nn.Linear (or hfcompress QuantLinear) layers, got "
                                f"{type(base).__name__}; exclude it with L4QConfig.exclude_modules or list linear "
                                "layers in target_modules")
            new = Linear(target, adapter_name, config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{current_key}: {e}") from None
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge and adapter_names is not None and len(adapter_names) != 1:
            raise ValueError(f"L4Q merges exactly one adapter into quantized layers, got adapter_names={adapter_names}")
        name = adapter_names[0] if adapter_names else None
        config = None
        layers = [(k, m) for k, m in self.model.named_modules() if isinstance(m, L4QLayer)]
        for key, layer in layers:
            if merge:
                adapter = name or layer._l4q_active()
                if adapter is None:
                    raise ValueError(f"{key}: no active L4Q adapter to merge; call set_adapter(name) first")
                if layer.merged:
                    layer.unmerge()
                q = layer.to_quant_linear(adapter)
                if safe_merge and not torch.isfinite(q.dequantize()).all():
                    raise ValueError(f"{key}: NaNs in the merged weights of L4Q adapter {adapter!r}")
                config = config or self.peft_config[adapter]
                set_submodule(self.model, key, q)
            else:
                if layer.merged:
                    layer.unmerge()
                set_submodule(self.model, key, layer.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        if merge and config is not None:
            quant_config = export_quant_config(self.model, config)
            for hook in AFTER_QUANTIZE_HOOKS:
                hook(self.model, quant_config)
        return self.model


def export_quant_config(model: nn.Module, config: L4QConfig) -> L4QQuantConfig:
    """The quantization config of ``model`` once its L4Q layers are QuantLinear: every linear
    layer left in float is listed in ``modules_to_not_convert`` so a reload rebuilds the same tree."""
    float_linears = [k for k, m in model.named_modules() if is_linear(m)]
    return L4QQuantConfig(bits=config.bits, group_size=config.group_size, sym=config.sym, r=config.r,
                          lora_alpha=config.lora_alpha, init_scales=config.init_scales,
                          modules_to_not_convert=float_linears)
