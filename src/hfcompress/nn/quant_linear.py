"""QuantLinear: a linear layer stored in the int_group format (see hfcompress.formats.int_group)."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.int_group import (
    FORMAT_NAME,
    IntGroupSpec,
    dequantize,
    pack_codes,
    validate_tensors,
)
from ..ops import int_group_mm

_QUANT_BUFFERS = ("weight", "weight_scale", "weight_zero", "weight_g_idx")


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as packed integer codes + per-group scales/zeros.

    Buffers (persistent, saved by ``state_dict``): ``weight`` (int32 packed codes),
    ``weight_scale`` (fp16), ``weight_zero`` (int32, packed along out_features, asymmetric only),
    ``weight_g_idx`` (int32, act-order only). ``bias`` is an ordinary parameter.
    ``compute_dtype`` is the float dtype the layer was built for (what :meth:`dequantize`
    returns by default); activations of any float dtype are accepted.
    """

    format = FORMAT_NAME

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: IntGroupSpec,
                 compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        spec.check_layer(in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.compute_dtype = compute_dtype
        #: the layer it replaced was a GPT-2 style Conv1D (weight stored [in, out]); set by
        #: modules.set_submodule, not saved (a reload replaces the float skeleton's Conv1D again).
        self.source_conv1d = False
        for name, (shape, dtype) in spec.tensor_shapes(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        for name in _QUANT_BUFFERS:
            if name not in self._buffers:
                self.register_buffer(name, None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   g_idx: torch.Tensor | None, spec: IntGroupSpec, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """Build from unpacked codes ``[N, K]``, scales ``[N, G]``, integer zeros ``[N, G]``."""
        n, k = codes.shape
        layer = cls(k, n, bias is not None, spec, compute_dtype, device=codes.device)
        layer.load_packed(**pack(codes, scale, zero, g_idx, spec))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(compute_dtype))
        return layer

    def load_packed(self, **tensors: torch.Tensor) -> None:
        validate_tensors(tensors, self.spec, self.out_features, self.in_features, where=type(self).__name__)
        for name, t in tensors.items():
            setattr(self, name, t.to(self._buffers[name].device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]`` exactly as :meth:`forward` computes with it."""
        return dequantize(self.weight, self.weight_scale, self.weight_zero, self.weight_g_idx, self.spec,
                          self.in_features, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_group_mm(x, self.weight, self.weight_scale, self.weight_zero, self.weight_g_idx, self.bias,
                            self.spec.bits, self.spec.group_size, self.spec.sym, self.in_features)

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` must not round the stored scales: move them, never recast them.
        kept = {n: self._buffers[n] for n in ("weight_scale",) if self._buffers.get(n) is not None}
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}, act_order={s.act_order}")


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, g_idx: torch.Tensor | None,
         spec: IntGroupSpec) -> dict[str, torch.Tensor]:
    """Unpacked algorithm output -> the stored tensors of the int_group format."""
    out = {"weight": pack_codes(codes, spec.bits), "weight_scale": scale.to(torch.float16)}
    if not spec.sym:
        out["weight_zero"] = pack_codes(zero.t(), spec.bits)  # [G, N] packed along N
    if spec.act_order:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out
