"""SpQRLinear: a linear layer stored in the spqr format."""

from __future__ import annotations

import torch

from ..layer import CompressedLinear
from .op import is_plain_cpu_inference, spqr_mm, spqr_mm_cpu_direct
from .reference import dequantize, pack
from .spec import FORMAT_NAME, SpQRSpec


class SpQRLinear(CompressedLinear):
    """``y = x W^T + b`` with ``W`` = small-group integer grid (quantized statistics) + fp16
    sparse outliers. Buffers: the tensors of :meth:`SpQRSpec.tensors` (persistent); ``bias`` an
    ordinary parameter. The number of outliers (``nnz``) is per layer: a reload sizes the
    buffers from the checkpoint before loading."""

    format = FORMAT_NAME

    @classmethod
    def from_codes(cls, result, spec: SpQRSpec, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> "SpQRLinear":
        """Build from the algorithm output (``hfcompress.algorithms.spqr.SpQRResult``)."""
        n, k = result.codes.shape
        layer = cls(k, n, bias is not None, spec, compute_dtype, device=result.codes.device)
        layer.load_packed(**pack(result, spec, k))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(compute_dtype))
        return layer

    @property
    def n_outliers(self) -> int:
        return self.weight_outlier_val.numel()

    def _stored_args(self):
        b = self._buffers  # plain dict lookups (``Module.__getattr__`` costs ~0.6 us a name per decoding call)
        return (b["weight"], b["weight_zero"], b["weight_scale_code"], b["weight_scale_scale"], b["weight_scale_zero"],
                b["weight_perm"], b["weight_outlier_ptr"], b["weight_outlier_col"], b["weight_outlier_val"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]`` exactly as :meth:`forward`'s reference computes with it."""
        return dequantize(*self._stored_args(), self.spec, self.in_features, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        args = (x, *self._stored_args(), self.bias, s.bits, s.group_size, s.stat_bits, s.stat_group_size,
                self.in_features)
        if is_plain_cpu_inference(x, self.bias):  # decoding on CPU: the op's CPU kernel without the dispatcher
            return spqr_mm_cpu_direct(*args)
        return spqr_mm(*args)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: SpQRSpec,
                   compute_dtype: torch.dtype | None = None, outlier_threshold: float = float("inf")) -> "SpQRLinear":
        """Data-free: SpQR with an identity Hessian (plain rounding on the spqr grid)."""
        from ...algorithms.spqr import prepare_hessian, spqr

        k = weight.shape[1]
        hessian = prepare_hessian(torch.eye(k, device=weight.device), 0.0, act_order=False)
        result = spqr(weight, hessian, spec.bits, spec.group_size, spec.stat_bits, spec.stat_group_size,
                      outlier_threshold)
        return cls.from_codes(result, spec, bias=bias, compute_dtype=compute_dtype or weight.dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor, mse_clip: bool = True) -> "SpQRLinear":
        """Store a new float ``weight [out, in]`` on this layer's grid layout (identity Hessian,
        no outliers, same permutation)."""
        from ...algorithms.spqr import Hessian, spqr

        k = self.in_features
        perm = self.weight_perm.long() if self.spec.act_order else torch.arange(k, device=weight.device)
        hessian = Hessian(torch.eye(k, device=weight.device), perm.to(weight.device),
                          torch.zeros(k, dtype=torch.bool, device=weight.device))
        s = self.spec
        result = spqr(weight, hessian, s.bits, s.group_size, s.stat_bits, s.stat_group_size)
        self.load_packed(**pack(result, s, k))
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={s.bits}, group_size={s.group_size}, stat_bits={s.stat_bits}, "
                f"stat_group_size={s.stat_group_size}, act_order={s.act_order}, outliers={self.n_outliers}")
