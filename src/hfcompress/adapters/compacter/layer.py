"""Compacter layers: a bottleneck adapter on a module's output, ``h + up(act(down(h)))``, whose
projections are PHM layers (parameterised hypercomplex multiplication):

    W = sum_{i=1..n} kron(S_i, B_i),   S_i: [n, n] shared by every adapter layer of the model,
                                       B_i = s_i t_i^T: [k/n, d/n], rank ``r``, per layer.

Parameter count of one adapter on a module with output size k, bottleneck d:
``down: n*(k/n + d/n)*r + d``, ``up: n*(d/n + k/n)*r + k`` -> ``2r(k + d) + k + d``; plus
``n^3`` for the shared ``S`` once per model.
"""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from .config import CompacterConfig

_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def phm_weight(shared: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(S_i, s_i t_i^T)`` as a dense ``[n*p, n*q]`` matrix.

    shared: [n, n, n] (S_i = shared[i]); s: [n, p, r]; t: [n, q, r].
    """
    fast = torch.einsum("ipr,iqr->ipq", s, t)  # B_i = s_i t_i^T: [n, p, q]
    n, p, q = fast.shape
    # kron(S_i, B_i)[a*p + x, b*q + y] = S_i[a, b] * B_i[x, y], summed over i
    return torch.einsum("iab,ixy->axby", shared.to(fast.dtype), fast).reshape(n * p, n * q)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of nn.Linear, GPT-2 Conv1D (weight [in, out]) or QuantLinear."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"Compacter cannot tell the input/output size of {type(module).__name__}; target a linear layer "
                    "(nn.Linear, transformers Conv1D or an hfcompress QuantLinear)")


def glorot_uniform_(t: torch.Tensor) -> torch.Tensor:
    """Each ``t[i]`` ([p, r]) Xavier-uniform with gain sqrt(2), the reference's "glorot-uniform"."""
    for i in range(t.shape[0]):
        nn.init.xavier_uniform_(t[i], gain=math.sqrt(2))
    return t


class CompacterLayer(BaseTunerLayer):
    """Mixin holding one Compacter adapter per adapter name on the output of ``base_layer``."""

    adapter_layer_names = ("compacter_shared", "compacter_down_s", "compacter_down_t", "compacter_down_bias",
                           "compacter_up_s", "compacter_up_t", "compacter_up_bias")
    other_param_names = ("compacter_act",)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.compacter_down_s = nn.ParameterDict({})  # [n, k/n, r]
        self.compacter_down_t = nn.ParameterDict({})  # [n, d/n, r]
        self.compacter_down_bias = nn.ParameterDict({})  # [d]
        self.compacter_up_s = nn.ParameterDict({})  # [n, d/n, r]
        self.compacter_up_t = nn.ParameterDict({})  # [n, k/n, r]
        self.compacter_up_bias = nn.ParameterDict({})  # [k]
        self.compacter_act: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # like every PEFT tuner layer; the adapter acts on the output, so its size is out_features
        self.in_features, self.out_features = in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: CompacterConfig, shared: nn.ParameterDict,
                     where: str = "") -> None:
        k, n, r = self.out_features, config.n, config.rank
        d = config.bottleneck(k)
        if k == 1:
            raise ValueError(f"Compacter on {where or type(self.get_base_layer()).__name__}: output size 1 leaves "
                             "nothing to factor (n and the bottleneck d must both be 1, so S_i, s_i and t_i are "
                             "scalars: no Kronecker structure and no bottleneck, the adapter is a product of scalars "
                             "on one channel); target a layer with at least 2 outputs")
        if k % n:
            raise ValueError(f"Compacter on {where or type(self.get_base_layer()).__name__}: output size {k} is not "
                             f"divisible by CompacterConfig.n={n}; choose n dividing {k}")
        if tuple(shared[adapter_name].shape) != (n, n, n):
            raise ValueError(f"Compacter adapter {adapter_name!r}: shared S has shape {tuple(shared[adapter_name].shape)}, "
                             f"expected {(n, n, n)}")
        self.compacter_shared = shared  # the tuner's dict: one S per adapter for the whole model
        fp32 = dict(device=shared[adapter_name].device, dtype=torch.float32)
        down_s, down_t = torch.empty(n, k // n, r, **fp32), torch.empty(n, d // n, r, **fp32)
        up_s, up_t = torch.empty(n, d // n, r, **fp32), torch.empty(n, k // n, r, **fp32)
        down_b, up_b = torch.zeros(d, **fp32), torch.zeros(k, **fp32)
        if down_s.device.type != "meta":  # loading with low_cpu_mem_usage: values come from the checkpoint
            for t in (down_s, down_t, up_s, up_t):
                glorot_uniform_(t)
            if config.init_weights:
                # s of the down-projection zero: W_down = 0, so down(h) = act(0) = 0 and up(0) = 0 (zero
                # biases): the adapter starts as the identity. Every bottleneck unit starts at the
                # activation's origin (GELU's slope 1/2 there), so none starts dead whatever the input scale
                down_s.zero_()
            else:  # non-identity start (tests): every factor and bias random
                down_b.normal_(std=0.02)
                up_b.normal_(std=0.02)
        self.compacter_down_s[adapter_name] = nn.Parameter(down_s)
        self.compacter_down_t[adapter_name] = nn.Parameter(down_t)
        self.compacter_up_s[adapter_name] = nn.Parameter(up_s)
        self.compacter_up_t[adapter_name] = nn.Parameter(up_t)
        self.compacter_down_bias[adapter_name] = nn.Parameter(down_b)
        self.compacter_up_bias[adapter_name] = nn.Parameter(up_b)
        self.compacter_act[adapter_name] = config.non_linearity
        # the base layer's device and float dtype (PEFT then upcasts to fp32 if autocast_adapter_dtype)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapter_delta(self, h: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``up(act(down(h)))`` for one adapter; h: [..., k] -> [..., k]."""
        shared = self.compacter_shared[adapter_name]
        w_down = phm_weight(shared, self.compacter_down_s[adapter_name], self.compacter_down_t[adapter_name])  # [k, d]
        w_up = phm_weight(shared, self.compacter_up_s[adapter_name], self.compacter_up_t[adapter_name])  # [d, k]
        h = h.to(w_down.dtype)
        z = _ACT[self.compacter_act[adapter_name]](h @ w_down + self.compacter_down_bias[adapter_name])  # [..., d]
        return z @ w_up + self.compacter_up_bias[adapter_name]


class CompacterWrapper(nn.Module, CompacterLayer):
    """``y = base(x); y + sum_{active} up(act(down(y)))``. Compacter has a non-linearity inside the
    adapter, so it cannot be merged into the base weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CompacterConfig,
                 shared: nn.ParameterDict, where: str = "", **kwargs) -> None:
        super().__init__()
        CompacterLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, shared, where=where)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        out = h
        for name in self.active_adapters:
            if name in self.compacter_down_s:
                out = out + self.adapter_delta(h, name).to(h.dtype)
        return out

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("Compacter adapters cannot be merged into the base weights: the adapter computes "
                         "h + up(act(down(h))) with a non-linearity in between, which no single weight matrix "
                         "represents. Keep the adapter (PeftModel), or call unload() to drop it.")

    def unmerge(self) -> None:
        warnings.warn("Compacter adapters are never merged; nothing to unmerge.")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError("Compacter has no weight delta (non-linear adapter); see CompacterWrapper.merge")

    def __repr__(self) -> str:
        return "compacter." + super().__repr__()


def init_shared(n: int, std: float, device=None, dtype=None) -> torch.Tensor:
    """The shared ``S`` [n, n, n] ~ N(0, std^2) (see CompacterConfig.init_std)."""
    return torch.randn(n, n, n, device=device).mul_(std).to(dtype)
