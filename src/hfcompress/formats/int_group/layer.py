"""QuantLinear: a linear layer stored in the int_group format."""

from __future__ import annotations

import dataclasses

import torch

from ..layer import CompressedLinear
from .op import BACKENDS, int_group_mm
from .pack import pack
from .reference import default_g_idx, dequantize
from .spec import FORMAT_NAME, IntGroupSpec


class QuantLinear(CompressedLinear):
    """``y = x W^T + b`` with ``W`` held as packed integer codes + per-group scales/zeros.

    Buffers (persistent, saved by ``state_dict``): ``weight`` (int32 packed codes),
    ``weight_scale`` (fp16), ``weight_zero`` (int32, packed along out_features, asymmetric only;
    fp16 ``[G, N]`` with ``zero_point="float"``),
    ``weight_g_idx`` (int32, act-order only). ``bias`` is an ordinary parameter.
    ``compute_dtype`` is the float dtype the layer was built for (what :meth:`dequantize`
    returns by default); activations of any float dtype are accepted.
    """

    format = FORMAT_NAME

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   g_idx: torch.Tensor | None, spec: IntGroupSpec, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """Build from unpacked codes ``[N, K]``, scales ``[N, G]``, zeros ``[N, G]`` (integers; any
        fp16-representable values with ``zero_point="float"``)."""
        n, k = codes.shape
        layer = cls(k, n, bias is not None, spec, compute_dtype, device=codes.device)
        layer.load_packed(**pack(codes, scale, zero, g_idx, spec))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(compute_dtype))
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]`` exactly as :meth:`forward` computes with it."""
        return dequantize(self.weight, self.weight_scale, self.weight_zero, self.weight_g_idx, self.spec,
                          self.in_features, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.weight, self.weight_scale, self.weight_zero, self.weight_g_idx, self.bias,
                self.spec.bits, self.spec.group_size, self.spec.sym, self.in_features)
        if _plain_cpu_inference(x, self.bias):
            # what the op's CPU kernel runs (its backend, or the reference when that declines), called
            # directly: the dispatcher's round trips through Python (op wrapper, autograd, device
            # kernel) cost a good part of a decode step's int4 matmul
            impl = BACKENDS.impls.get("cpu")
            y = impl(*args) if impl is not None else None
            return y if y is not None else BACKENDS.reference(*args)
        return int_group_mm(*args)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor, mse_clip: bool = True) -> "QuantLinear":
        """Store a new float ``weight [out, in]`` with RTN on this layer's own grid layout (same
        bits, groups, symmetry; act-order layers keep their g_idx)."""
        from ...algorithms.rtn import rtn

        spec = self.spec
        plain = dataclasses.replace(spec, act_order=False)
        w = weight.to(torch.float32)
        if spec.act_order:
            g_idx = self.weight_g_idx.long()
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], default_g_idx(plain, self.in_features, g_idx.device).long()):
                raise ValueError("requantize_: this layer's g_idx does not form equal contiguous groups once sorted")
            codes_p, scale, zero, _ = rtn(w[:, perm], plain, mse_clip=mse_clip)
            codes = torch.empty_like(codes_p)
            codes[:, perm] = codes_p
            tensors = pack(codes, scale, zero, self.weight_g_idx, spec)
        else:
            codes, scale, zero, _ = rtn(w, plain, mse_clip=mse_clip)
            tensors = pack(codes, scale, zero, None, spec)
        self.load_packed(**tensors)
        return self

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: IntGroupSpec,
                   compute_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Data-free fallback: RTN (MSE clip) of a float ``weight [out, in]`` on ``spec``'s grid
        (natural groups; an act-order spec stores the natural g_idx)."""
        from ...algorithms.rtn import rtn

        plain = dataclasses.replace(spec, act_order=False)
        codes, scale, zero, _ = rtn(weight, plain, mse_clip=True)
        g_idx = default_g_idx(spec, weight.shape[1], weight.device) if spec.act_order else None
        return cls.from_codes(codes, scale, zero, g_idx, spec, bias=bias, compute_dtype=compute_dtype or weight.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}, act_order={s.act_order}"
                + (f", zero_point={s.zero_point}" if s.zero_point != "int" else ""))


def _plain_cpu_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """An eager call on plain CPU tensors that records no graph: nothing (autograd, torch.compile,
    tracing, tensor subclasses) needs to see the op itself, so its CPU kernel may run directly."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())
