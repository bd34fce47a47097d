"""``CompressedLinear``: what every format's layer class shares.

A compressed layer computes ``y = x W^T + b`` with ``W`` held in its format's stored tensors
(persistent buffers, exactly the names and shapes ``spec.tensors(out, in)`` lists) and ``bias``
an ordinary float parameter. ``forward`` calls the format's op; ``dequantize()`` gives the
float weight ``[out, in]`` exactly as ``forward`` computes with it (what EoRA, merging and
``dequantize_`` read). Float stored tensors (scales ...) keep their stored dtype through
``.to(dtype)`` / ``.half()``: only ``compute_dtype`` follows.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import FormatError, bind_sizes, validate_tensors


class CompressedLinear(nn.Module):
    """Base of the layer classes of all formats (subclasses set ``format`` and implement
    :meth:`dequantize` and :meth:`forward`)."""

    format: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec,
                 compute_dtype: torch.dtype = torch.float32, device=None, sizes: dict[str, int] | None = None):
        super().__init__()
        spec.check_layer(in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.compute_dtype = compute_dtype
        #: the layer it replaced was a GPT-2 style Conv1D (weight stored [in, out]); set by
        #: modules.set_submodule, not saved (a reload replaces the float skeleton's Conv1D again).
        self.source_conv1d = False
        self._register_stored(device, sizes or {})
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def _register_stored(self, device, sizes: dict[str, int]) -> None:
        specs = self.spec.tensors(self.out_features, self.in_features)
        for name, ts in specs.items():
            shape = ts.concrete({**self.spec.default_sizes(), **sizes})
            self.register_buffer(name, torch.zeros(shape, dtype=ts.dtype, device=device))
        for name in self.spec.all_tensor_names():
            if name not in self._buffers:
                self.register_buffer(name, None)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The format's stored tensors of this layer (bias excluded)."""
        return {n: self._buffers[n] for n in self.spec.tensors(self.out_features, self.in_features)}

    def resize_stored_(self, sizes: dict[str, int]) -> None:
        """Re-create the buffers for per-layer sizes (e.g. the number of outliers of a checkpoint),
        on the buffers' current device, before a checkpoint's tensors are loaded into them."""
        device = next(iter(self.stored_tensors().values())).device
        self._register_stored(device, sizes)

    def load_packed(self, **tensors: torch.Tensor) -> None:
        """Set the stored tensors (validated against the spec; per-layer sizes follow them)."""
        sizes = bind_sizes(tensors, self.spec, self.out_features, self.in_features, type(self).__name__)
        validate_tensors(tensors, self.spec, self.out_features, self.in_features, where=type(self).__name__)
        if sizes:
            self.resize_stored_(sizes)
        for name, t in tensors.items():
            if name not in self._buffers:
                raise FormatError(f"{type(self).__name__}: {name} is not a tensor of the {self.format} format")
            setattr(self, name, t.to(self._buffers[name].device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` must not round stored float tensors: move them, never recast them.
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self
