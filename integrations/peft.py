"""PEFT glue: the one module that touches PEFT internals.

* LoRA on hfcompress layers: ``LoraModel._create_new_module`` is wrapped so that a plain
  ``LoraConfig`` targeting a :class:`~hfcompress.nn.QuantLinear` gets a :class:`LoraQuantLinear`
  (PEFT's own dispatch list is closed; ``_register_custom_module`` is not serialized, so
  ``PeftModel.from_pretrained`` would not find it again).
* Merging LoRA into a quantized base changes the stored integers; it is refused unless
  asked for with :func:`merge_and_requantize`.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from hfcompress.api import requantize_
from hfcompress.nn import QuantLinear

_REQUANTIZE = {"on": False}


class LoraQuantLinear(torch.nn.Module, LoraLayer):
    """LoRA over a QuantLinear base: ``y = base(x) + B(A(dropout(x))) * scaling``."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("LoRA on an hfcompress QuantLinear does not support DoRA (use_dora=True)")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, a.weight.dtype)
            result = result + b(a(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(out_dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if not _REQUANTIZE["on"]:
            raise ValueError(
                "Merging LoRA into an hfcompress-quantized layer would re-quantize its weights (lossy). "
                "Call hfcompress.merge_and_requantize(peft_model) to do that explicitly, or keep the adapter "
                "unmerged, or merge into the float base model instead.")
        base = self.get_base_layer()
        names = adapter_names if adapter_names is not None else self.active_adapters
        w = base.dequantize(torch.float32)
        for name in names:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).to(w.device)
                self.merged_adapters.append(name)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights of adapter(s) {names}")
        requantize_(base, w)

    def unmerge(self) -> None:
        raise ValueError("A LoRA merged into an hfcompress-quantized layer was re-quantized; it cannot be unmerged")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_hfcompress(target, adapter_name, config, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear):
        return LoraQuantLinear(target, adapter_name, config=config, **kwargs)
    return None


def merge_and_requantize(peft_model, **kwargs):
    """``merge_and_unload()`` for a LoRA on a quantized base: each merged layer is re-quantized
    (RTN, same bits/groups) from ``dequantize(W) + B A * scaling``. Lossy by nature."""
    with _requantize_merges():
        return peft_model.merge_and_unload(**kwargs)


@contextlib.contextmanager
def _requantize_merges():
    _REQUANTIZE["on"] = True
    try:
        yield
    finally:
        _REQUANTIZE["on"] = False


def _wrap_create_new_module() -> None:
    original = LoraModel._create_new_module
    if getattr(original, "_hfcompress", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_hfcompress(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._hfcompress = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


def register() -> None:
    _wrap_create_new_module()
