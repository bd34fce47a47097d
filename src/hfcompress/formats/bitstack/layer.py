"""BitStackLinear: a linear layer stored as stacked sign-plane x low-rank blocks."""

from __future__ import annotations

import torch

from ..layer import CompressedLinear
from .op import bitstack_mm
from .reference import dequantize, pack_signs
from .spec import FORMAT_NAME, BitStackSpec


class BitStackLinear(CompressedLinear):
    """``y = x W^T + b``, ``W = (sum_{i < blocks} S_i * (u_i v_i)) / s``. Buffers: the tensors of
    :meth:`BitStackSpec.tensors`; the number of blocks held is per layer (``n_blocks``) and can
    change (:meth:`keep_blocks_`, :meth:`add_blocks_`): a smaller model is a prefix of the blocks."""

    format = FORMAT_NAME

    @classmethod
    def from_decomposition(cls, signs, u, v, in_scale, gain, spec: BitStackSpec, bias=None,
                           compute_dtype: torch.dtype = torch.float32) -> "BitStackLinear":
        """From ``hfcompress.algorithms.bitstack.bitstack_decompose`` output (signs as bool)."""
        _, n, k = signs.shape
        layer = cls(k, n, bias is not None, spec, compute_dtype, device=u.device)
        layer.load_packed(weight=pack_signs(signs), weight_u=u.to(torch.float16), weight_v=v.to(torch.float16),
                          weight_in_scale=in_scale.to(torch.float32), weight_gain=gain.to(torch.float32))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(compute_dtype))
        return layer

    @property
    def n_blocks(self) -> int:
        return self.weight.shape[0]

    def keep_blocks_(self, n: int) -> "BitStackLinear":
        """Keep the first ``n`` blocks (frees the others)."""
        if not 0 <= n <= self.n_blocks:
            raise ValueError(f"keep_blocks_({n}): the layer holds {self.n_blocks} blocks")
        for name in ("weight", "weight_u", "weight_v", "weight_gain"):
            setattr(self, name, self._buffers[name][:n].clone())
        return self

    def add_blocks_(self, weight, weight_u, weight_v, weight_gain) -> "BitStackLinear":
        """Append blocks (the next ones of the stack, read from the checkpoint)."""
        new = dict(weight=weight, weight_u=weight_u, weight_v=weight_v, weight_gain=weight_gain)
        merged = {n: torch.cat([self._buffers[n], t.to(self._buffers[n].device)]) for n, t in new.items()}
        self.load_packed(**merged, weight_in_scale=self.weight_in_scale)
        return self

    def _stored_args(self):
        return self.weight, self.weight_u, self.weight_v, self.weight_in_scale

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(*self._stored_args(), self.in_features, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitstack_mm(x, *self._stored_args(), self.bias, self.in_features)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias, spec: BitStackSpec, compute_dtype=None, n_blocks: int = 4):
        """Data-free: activation scale 1 (plain BitStack decomposition)."""
        from ...algorithms.bitstack import bitstack_decompose

        scale = torch.ones(weight.shape[1], device=weight.device)
        signs, u, v, gain = bitstack_decompose(weight, scale, n_blocks, spec.rank)
        return cls.from_decomposition(signs, u, v, scale, gain, spec, bias=bias,
                                      compute_dtype=compute_dtype or weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.spec.rank}, blocks={self.n_blocks}")
