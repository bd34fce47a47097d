"""L4Q layers: a frozen float linear trained through the quantizer of its LoRA-merged weight."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...algorithms.l4q import (
    fake_quantize,
    l4q_linear,
    merged_weight,
    quantize_merged,
    stored_step,
    stored_zero,
)
from ...algorithms.rtn import rtn
from ...formats.int_group import IntGroupSpec, default_g_idx, unpack_codes
from ...nn import QuantLinear
from .config import L4QConfig


class L4QLayer(BaseTunerLayer):
    """Adapter state per adapter name: ``l4q_A [r, K]``, ``l4q_B [N, r]``, ``l4q_step [N, G]``
    (learned steps, fp32) and, asymmetric, ``l4q_zero [N, G]`` (learned offsets in code units)."""

    adapter_layer_names = ("l4q_A", "l4q_B", "l4q_step", "l4q_zero")
    other_param_names = ("l4q_r", "l4q_scaling", "l4q_spec")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.l4q_A = nn.ParameterDict({})
        self.l4q_B = nn.ParameterDict({})
        self.l4q_step = nn.ParameterDict({})
        self.l4q_zero = nn.ParameterDict({})
        self.l4q_r: dict[str, int] = {}
        self.l4q_scaling: dict[str, float] = {}
        self.l4q_spec: dict[str, IntGroupSpec] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._l4q_float_weight: Optional[torch.Tensor] = None  # the float W0 while merged
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"L4Q targets nn.Linear (or hfcompress QuantLinear) layers, got {type(base).__name__}; "
                            "exclude this module (L4QConfig.exclude_modules) or target linear layers only")
        if isinstance(base, QuantLinear) and base.weight_g_idx is not None:
            raise ValueError("L4Q on a quantized base needs contiguous groups; this layer has act-order g_idx. "
                             "Quantize with act_order=False (or GPTQConfig(static_groups=True)), or start from "
                             "the float model")
        if isinstance(base, QuantLinear) and base.spec.zero_point == "float":
            raise ValueError("L4Q on a quantized base learns integer zero points; this layer stores float zero "
                             "points (zero_point='float', GPTQConfig's and RTNConfig's default). Quantize with "
                             "zero_point='int', or start from the float model")
        self.in_features, self.out_features = base.in_features, base.out_features

    def _l4q_w0(self) -> torch.Tensor:
        """The frozen weight ``W0 [N, K]``: the float base weight, or a quantized base's
        dequantized weight (kept as a non-persistent buffer, never saved)."""
        if self._l4q_float_weight is not None:
            return self._l4q_float_weight
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            if getattr(self, "l4q_base_weight", None) is None:
                self.register_buffer("l4q_base_weight", base.dequantize(torch.float32), persistent=False)
            return self.l4q_base_weight
        return base.weight

    def update_layer(self, adapter_name: str, config: L4QConfig, **kwargs) -> None:
        base = self.get_base_layer()
        spec = config.spec
        spec.check_layer(self.in_features)
        n_groups = spec.n_groups(self.in_features)
        device = base.weight.device
        fp32 = dict(device=device, dtype=torch.float32)
        self.l4q_r[adapter_name] = config.r
        self.l4q_scaling[adapter_name] = config.scaling
        self.l4q_spec[adapter_name] = spec
        self.l4q_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features, **fp32))
        self.l4q_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, config.r, **fp32))
        self.l4q_step[adapter_name] = nn.Parameter(torch.empty(self.out_features, n_groups, **fp32))
        if not spec.sym:
            self.l4q_zero[adapter_name] = nn.Parameter(torch.empty(self.out_features, n_groups, **fp32))
        if base.weight.device.type != "meta" and self.l4q_A[adapter_name].device.type != "meta":
            # (adapter tensors on meta: loading with low_cpu_mem_usage, the values come from the checkpoint)
            self.reset_l4q_parameters(adapter_name, config)
        # initialised in fp32, then held in the base layer's float dtype (QuantLinear: its compute dtype) like
        # every PEFT adapter; PEFT upcasts them back to fp32 when autocast_adapter_dtype=True (its default)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_l4q_parameters(self, adapter_name: str, config: L4QConfig) -> None:
        """LoRA init (A Kaiming-uniform, B zero) and the quantizer fitted to the frozen weight."""
        nn.init.kaiming_uniform_(self.l4q_A[adapter_name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.l4q_B[adapter_name])
        else:
            nn.init.normal_(self.l4q_B[adapter_name], std=0.02)
        base, spec = self.get_base_layer(), self.l4q_spec[adapter_name]
        if isinstance(base, QuantLinear) and base.spec == spec and config.init_weights:
            # start from the stored grid: at B = 0 this computes exactly the quantized base (GPTQ, RTN ...)
            self.l4q_step[adapter_name].copy_(base.weight_scale.float())
            if not spec.sym:
                self.l4q_zero[adapter_name].copy_(
                    unpack_codes(base.weight_zero, spec.bits, self.out_features).t().float())
            return
        w = merged_weight(self._l4q_w0(), self.l4q_A[adapter_name], self.l4q_B[adapter_name],
                          self.l4q_scaling[adapter_name])
        _, scale, zero, _ = rtn(w, spec, mse_clip=config.init_scales == "mse")
        self.l4q_step[adapter_name].copy_(scale)
        if zero is not None:
            self.l4q_zero[adapter_name].copy_(zero.float())

    def _l4q_active(self) -> Optional[str]:
        names = [n for n in self.active_adapters if n in self.l4q_A]
        if len(names) > 1:
            raise ValueError(f"L4Q quantizes one merged weight per layer; {len(names)} L4Q adapters are active "
                             f"({names}). Activate one with set_adapter(name).")
        return names[0] if names else None

    # -- the quantized weight as the forward computes it / as the checkpoint stores it ------------
    @torch.no_grad()
    def _l4q_grid(self, adapter_name: str):
        """``(w [N, K] merged fp32, s, z [N, G] stored values, g_idx [K], spec, w0)``."""
        spec = self.l4q_spec[adapter_name]
        w0 = self._l4q_w0()
        step = self.l4q_step[adapter_name]
        s = stored_step(step)
        z = stored_zero(self.l4q_zero[adapter_name] if not spec.sym else None, spec, step)
        g_idx = default_g_idx(spec, self.in_features, w0.device).long()
        w = merged_weight(w0, self.l4q_A[adapter_name], self.l4q_B[adapter_name], self.l4q_scaling[adapter_name])
        return w, s, z, g_idx, spec, w0

    @torch.no_grad()
    def l4q_quantized(self, adapter_name: str):
        """``(codes [N, K], scale [N, G], zero [N, G] | None)`` of ``adapter_name``'s merged weight,
        exactly as the training forward quantizes it."""
        w, s, z, g_idx, spec, _ = self._l4q_grid(adapter_name)
        q, _, _ = quantize_merged(w, s, z, spec, g_idx)
        return q.to(torch.uint8), s, (None if spec.sym else z.to(torch.uint8))

    def to_quant_linear(self, adapter_name: Optional[str] = None) -> QuantLinear:
        """A QuantLinear (int_group format, no LoRA branch) computing what this layer computes."""
        adapter_name = adapter_name or self._l4q_active()
        if adapter_name is None or adapter_name not in self.l4q_A:
            raise ValueError(f"no L4Q adapter {adapter_name!r} on this layer (have {sorted(self.l4q_A)})")
        base = self.get_base_layer()
        codes, scale, zero = self.l4q_quantized(adapter_name)
        bias = None if base.bias is None else base.bias.detach()
        compute_dtype = base.compute_dtype if isinstance(base, QuantLinear) else base.weight.dtype
        return QuantLinear.from_codes(codes, scale, zero, None, self.l4q_spec[adapter_name], bias=bias,
                                      compute_dtype=compute_dtype)

    @torch.no_grad()
    def l4q_stats(self, adapter_name: str) -> dict[str, float]:
        """Fraction of weights clipped by the grid and the mean stored step (for logging)."""
        w, s, z, g_idx, spec, _ = self._l4q_grid(adapter_name)
        _, _, r = quantize_merged(w, s, z, spec, g_idx)
        rz = r + z[:, g_idx]
        clipped = ((rz < 0) | (rz > spec.maxq)).float().mean().item()
        return {"clip_fraction": clipped, "mean_step": s.mean().item()}


class Linear(nn.Module, L4QLayer):
    """L4Q over an ``nn.Linear``: ``y = x Q(W0 + scaling * B A)^T + b`` (see hfcompress.algorithms.l4q)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: L4QConfig, **kwargs) -> None:
        super().__init__()
        L4QLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        name = self._l4q_active()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        return l4q_linear(x, self._l4q_w0(), self.l4q_A[name], self.l4q_B[name], self.l4q_step[name],
                          self.l4q_zero[name] if name in self.l4q_zero else None, base.bias,
                          self.l4q_scaling[name], self.l4q_spec[name])

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the dequantized ``W_q`` into the float base weight (the original is kept for
        :meth:`unmerge`). ``merge_and_unload()`` instead swaps in a packed QuantLinear."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [n for n in adapter_names if n in self.l4q_A]
        if not names:
            return
        if len(names) > 1 or self.merged:
            raise ValueError(f"L4Q can merge one adapter per layer (one quantized weight); asked for {names} with "
                             f"{self.merged_adapters or 'none'} already merged. Unmerge first.")
        name = names[0]
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            raise ValueError("merge_adapter() writes float weights; this L4Q layer sits on a quantized base. Use "
                             "merge_and_unload() or hfcompress.l4q.export, which store the trained grid")
        codes, s, z = self.l4q_quantized(name)
        spec = self.l4q_spec[name]
        g_idx = default_g_idx(spec, self.in_features, codes.device).long()
        z = stored_zero(None, spec, s) if z is None else z.float()
        w_q = (codes.float() - z[:, g_idx]) * s[:, g_idx]
        if safe_merge and not torch.isfinite(w_q).all():
            raise ValueError(f"NaNs detected in the merged weights of L4Q adapter {name!r}")
        self._l4q_float_weight = base.weight.data.clone()
        base.weight.data.copy_(w_q.to(base.weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.get_base_layer().weight.data.copy_(self._l4q_float_weight)
        self._l4q_float_weight = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_q - W0``: what the adapter changes in the float weight (quantization included)."""
        w, s, z, g_idx, spec, w0 = self._l4q_grid(adapter_name)
        return fake_quantize(w, s, z, spec, g_idx) - w0.float()

    def __repr__(self) -> str:
        return "l4q." + super().__repr__()
