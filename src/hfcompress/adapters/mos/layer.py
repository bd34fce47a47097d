"""MoS layers. For a module with input size k and output size m, rank r = r_priv + r_pub and l
shards per vector:

    A = [A_priv ; pool_A[k][idx_A].reshape(r_pub, k)]        [r, k]
    B = [B_priv , pool_B[m][idx_B].reshape(r_pub, m)^T]      [m, r]
    y = base(x) + dropout(x) A^T B^T * lora_alpha / r

``pool_A[k]``: [N_k, k/l] shards shared by every layer whose input size is k (likewise B with m);
``idx_A``, ``idx_B``: [r_pub, l] integer index sets drawn once per layer (not trained, saved).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import MoSConfig


class IndexDict(nn.Module):
    """Persistent integer buffers keyed by adapter name (dict interface, like nn.ParameterDict)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=True)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, transformers Conv1D or an hfcompress QuantLinear."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight [in, out]
        return int(module.weight.shape[0]), int(module.nf)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"MoS cannot adapt {type(module).__name__}: target linear layers (nn.Linear, transformers "
                    "Conv1D or an hfcompress QuantLinear)")


def assemble(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Concatenate shards: pool [N, s], index [v, l] -> [v, l*s] (one vector per row)."""
    v, l = index.shape
    return pool[index.reshape(-1)].reshape(v, l * pool.shape[1])


class MoSLayer(BaseTunerLayer):
    adapter_layer_names = ("mos_pool_A", "mos_pool_B", "mos_private_A", "mos_private_B")
    other_param_names = ("mos_index_A", "mos_index_B", "mos_r", "mos_scaling", "mos_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.mos_pool_A = nn.ModuleDict({})  # replaced by the tuner's shared pools in attach_shards_
        self.mos_pool_B = nn.ModuleDict({})
        self.mos_private_A = nn.ParameterDict({})  # [r_priv, k]
        self.mos_private_B = nn.ParameterDict({})  # [m, r_priv]
        self.mos_index_A = IndexDict()  # [r_pub, l] into pool_A[str(k)]
        self.mos_index_B = IndexDict()  # [r_pub, l] into pool_B[str(m)]
        self.mos_dropout = nn.ModuleDict({})
        self.mos_r: dict[str, int] = {}
        self.mos_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_shape(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: MoSConfig, **kwargs) -> None:
        """Per-layer parts (private vectors, dropout, scaling). The shared pools and this layer's
        index sets are attached by the model once every layer of the adapter exists
        (:meth:`attach_shards_`), since pool sizes depend on how many layers draw from them."""
        k, m, rp = self.in_features, self.out_features, config.private_rank
        device = next((p.device for p in self.get_base_layer().parameters()), None)
        if rp:
            bound = 1 / math.sqrt(k)
            self.mos_private_A[adapter_name] = nn.Parameter(torch.empty(rp, k, device=device).uniform_(-bound, bound))
            b = torch.zeros(m, rp, device=device) if config.init_weights else \
                torch.empty(m, rp, device=device).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m))
            self.mos_private_B[adapter_name] = nn.Parameter(b)
        self.mos_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.mos_r[adapter_name] = config.r
        self.mos_scaling[adapter_name] = config.scaling
        # the base layer's device and float dtype (PEFT then upcasts to fp32 if autocast_adapter_dtype)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def attach_shards_(self, adapter_name: str, pool_A: nn.ModuleDict, pool_B: nn.ModuleDict,
                       index_A: torch.Tensor, index_B: torch.Tensor) -> None:
        """(requires_grad of the pools is the tuner's business: they are shared by every layer.)"""
        self.mos_pool_A = pool_A  # the tuner's pools, shared by every layer
        self.mos_pool_B = pool_B
        device = pool_A[adapter_name][str(self.in_features)].device
        self.mos_index_A[adapter_name] = index_A.to(device)
        self.mos_index_B[adapter_name] = index_B.to(device)

    def lora_A(self, adapter_name: str) -> torch.Tensor:
        """The materialised A [r, k] (private rows first)."""
        parts = [assemble(self.mos_pool_A[adapter_name][str(self.in_features)], self.mos_index_A[adapter_name])]
        if adapter_name in self.mos_private_A:
            parts.insert(0, self.mos_private_A[adapter_name])
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def lora_B(self, adapter_name: str) -> torch.Tensor:
        """The materialised B [m, r] (private columns first)."""
        parts = [assemble(self.mos_pool_B[adapter_name][str(self.out_features)], self.mos_index_B[adapter_name]).T]
        if adapter_name in self.mos_private_B:
            parts.insert(0, self.mos_private_B[adapter_name])
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B A * scaling`` as [out, in] (nn.Linear layout)."""
        return (self.lora_B(adapter_name) @ self.lora_A(adapter_name)) * self.mos_scaling[adapter_name]


class MoSLinear(nn.Module, MoSLayer):
    """``y = base(x) + dropout(x) A^T B^T * scaling`` with A, B assembled from the shared shard pools."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoSConfig, **kwargs) -> None:
        super().__init__()
        MoSLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.mos_index_A:
                continue
            a, b = self.lora_A(name), self.lora_B(name)
            xa = self.mos_dropout[name](x.to(a.dtype))
            result = result + ((xa @ a.T) @ b.T * self.mos_scaling[name]).to(out_dtype)
        return result

    def _base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if not isinstance(getattr(base, "weight", None), nn.Parameter) or not base.weight.is_floating_point():
            raise ValueError(f"MoS merge needs a float base weight; {type(base).__name__} stores it packed/quantized. "
                             "Keep the adapter unmerged, or export it with hfcompress.adapters.mos.to_lora(...) "
                             "and merge into the float model.")
        return base.weight

    def _delta_in_base_layout(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(name)
        if type(self.get_base_layer()).__name__ == "Conv1D":  # weight [in, out]
            delta = delta.T
        return delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        weight = self._base_weight()
        for name in adapter_names:
            if name not in self.mos_index_A:
                continue
            new = weight.data + self._delta_in_base_layout(name, weight)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken")
            weight.data = new
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mos_index_A:
                weight.data -= self._delta_in_base_layout(name, weight)

    def __repr__(self) -> str:
        return "mos." + super().__repr__()
