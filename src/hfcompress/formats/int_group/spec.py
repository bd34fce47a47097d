"""The int_group spec: the fields config.json stores and the tensors a layer stores
(the on-disk contract is documented in ``hfcompress.formats.int_group``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..registry import FormatError, TensorSpec, stored_bits

FORMAT_NAME = "int_group"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
ZERO_POINTS = ("int", "float")
ZERO_DTYPE = SCALE_DTYPE  # float zero points (zero_point="float")


@dataclass(frozen=True)
class IntGroupSpec:
    """What is stored: bits per code, group size along in_features, symmetry, act-order, and how
    asymmetric zero points are stored (``zero_point``: ``"int"``, integers packed like the codes;
    ``"float"``, one fp16 zero per group and output channel, in code units)."""

    format: ClassVar[str] = FORMAT_NAME
    #: what the stored bits beyond the codes are (inspect / cards)
    overhead: ClassVar[str] = "scales, zeros, g_idx"

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    zero_point: str = "int"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise FormatError(f"group_size must be an int, got {type(self.group_size).__name__}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise FormatError(
                f"group_size={self.group_size} is not supported; use -1 (per output channel) or a "
                "multiple of 8 that is at least 8 (32, 64, 128 are usual)"
            )
        if self.zero_point not in ZERO_POINTS:
            raise FormatError(f"zero_point={self.zero_point!r} is not supported; choose one of {ZERO_POINTS}")
        if self.zero_point == "float" and self.sym:
            raise FormatError("zero_point='float' with sym=True: a symmetric grid stores no zero points; "
                              "use sym=False, or zero_point='int'")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, in_features: int, where: str | None = None) -> None:
        """Raise if this spec cannot tile a layer with ``in_features`` inputs."""
        if self.group_size != -1 and self.group_size > in_features:
            raise FormatError(
                f"{where + ': ' if where else ''}group_size={self.group_size} is larger than in_features={in_features}; "
                "use group_size=-1 for one group per output channel, or a smaller group"
            )

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Names (relative to the module), shapes and dtypes of every stored tensor but bias."""
        g = self.n_groups(in_features)
        out = {
            "weight": TensorSpec((out_features, packed_len(in_features, self.bits)), torch.int32),
            "weight_scale": TensorSpec((out_features, g), SCALE_DTYPE),
        }
        if self.zero_point == "float":
            out["weight_zero"] = TensorSpec((g, out_features), ZERO_DTYPE)
        elif not self.sym:
            out["weight_zero"] = TensorSpec((g, packed_len(out_features, self.bits)), torch.int32)
        if self.act_order:
            out["weight_g_idx"] = TensorSpec((in_features,), torch.int32)
        return out

    def tensor_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """:meth:`tensors` as ``{name: (shape, dtype)}``."""
        return {n: (ts.shape, ts.dtype) for n, ts in self.tensors(out_features, in_features).items()}

    @staticmethod
    def all_tensor_names() -> tuple[str, ...]:
        """Every tensor name any int_group spec may store (attributes a layer always has)."""
        return ("weight", "weight_scale", "weight_zero", "weight_g_idx")

    @staticmethod
    def default_sizes() -> dict[str, int]:
        return {}  # every int_group shape follows from the spec and the layer's features

    def check_values(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                     where: str) -> None:
        """Value checks beyond shape/dtype (tensors not on meta only)."""
        t = tensors.get("weight_g_idx")
        if t is not None and self.act_order:
            g = self.n_groups(in_features)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= g:
                raise FormatError(f"{where}.weight_g_idx has values in [{lo}, {hi}], expected values in [0, {g}) "
                                  f"(the layer has {g} groups)")
        t = tensors.get("weight_scale")
        if t is not None and not torch.isfinite(t).all():
            raise FormatError(f"{where}.weight_scale contains non-finite scales")
        t = tensors.get("weight_zero")
        if t is not None and self.zero_point == "float" and not torch.isfinite(t).all():
            raise FormatError(f"{where}.weight_zero contains non-finite zero points")

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight including scales, zeros and g_idx (padding included)."""
        return stored_bits(self, out_features, in_features) / (out_features * in_features)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["zero_point"] == "int":  # the default is not written: configs from before the field stay the same
            del d["zero_point"]
        return d




def packed_len(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes / 32) * bits
