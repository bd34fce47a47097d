"""The spqr spec: the fields config.json stores and the tensors a layer stores (the on-disk
contract is documented in ``hfcompress.formats.spqr``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..registry import FormatError, TensorSpec, stored_bits

FORMAT_NAME = "spqr"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_STAT_BITS = (2, 3, 4, 8)
MAX_COLUMNS_INT16 = 1 << 15  # column indices (perm, outliers) are int16 up to this many input features


def packed_len(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes / 32) * bits


@dataclass(frozen=True)
class SpQRSpec:
    """Bits per weight code, group size along in_features (first level), bits of the quantized
    first-level scales and the size of their groups along out_features (second level),
    act-order (a stored column permutation)."""

    format: ClassVar[str] = FORMAT_NAME
    overhead: ClassVar[str] = "quantized statistics, permutation, outliers"

    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group_size: int = 16
    act_order: bool = True

    def __post_init__(self):
        for name, allowed in (("bits", SUPPORTED_BITS), ("stat_bits", SUPPORTED_STAT_BITS)):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in allowed:
                raise FormatError(f"{name}={value!r} is not supported by spqr; choose one of {allowed}")
        for name, step in (("group_size", 8), ("stat_group_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value % step:
                raise FormatError(f"{name}={value!r} must be an int >= 2{' and a multiple of 8' if step > 1 else ''} "
                                  "(16 is SpQR's default)")
        if not isinstance(self.act_order, bool):
            raise FormatError(f"act_order={self.act_order!r} must be a bool")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_size

    def n_stat_groups(self, out_features: int) -> int:
        return math.ceil(out_features / self.stat_group_size)

    def check_layer(self, in_features: int, where: str | None = None) -> None:
        """Raise if this spec cannot tile a layer with ``in_features`` inputs."""
        if in_features % self.group_size:
            raise FormatError(f"{where + ': ' if where else ''}in_features={in_features} is not a multiple of "
                              f"group_size={self.group_size}; spqr groups tile the input exactly (choose a "
                              "group_size that divides it, or keep this module in float)")

    @staticmethod
    def col_dtype(in_features: int) -> torch.dtype:
        return torch.int16 if in_features <= MAX_COLUMNS_INT16 else torch.int32

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Names (relative to the module), shapes and dtypes of every stored tensor but bias."""
        g, s = self.n_groups(in_features), self.n_stat_groups(out_features)
        out = {
            "weight": TensorSpec((out_features, packed_len(in_features, self.bits)), torch.int32),
            "weight_zero": TensorSpec((g, packed_len(out_features, self.bits)), torch.int32),
            "weight_scale_code": TensorSpec((g, packed_len(out_features, self.stat_bits)), torch.int32),
            "weight_scale_scale": TensorSpec((g, s), torch.float16),
            "weight_scale_zero": TensorSpec((g, s), torch.float16),
        }
        if self.act_order:
            out["weight_perm"] = TensorSpec((in_features,), self.col_dtype(in_features))
        out["weight_outlier_ptr"] = TensorSpec((out_features + 1,), torch.int32)
        out["weight_outlier_col"] = TensorSpec(("nnz",), self.col_dtype(in_features))
        out["weight_outlier_val"] = TensorSpec(("nnz",), torch.float16)
        return out

    @staticmethod
    def all_tensor_names() -> tuple[str, ...]:
        return ("weight", "weight_zero", "weight_scale_code", "weight_scale_scale", "weight_scale_zero",
                "weight_perm", "weight_outlier_ptr", "weight_outlier_col", "weight_outlier_val")

    @staticmethod
    def default_sizes() -> dict[str, int]:
        return {"nnz": 0}

    def check_values(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                     where: str) -> None:
        """Permutation, CSR structure and finiteness (tensors not on meta only)."""
        perm = tensors.get("weight_perm")
        if perm is not None and self.act_order:
            if not torch.equal(torch.sort(perm.long()).values, torch.arange(in_features, device=perm.device)):
                raise FormatError(f"{where}.weight_perm is not a permutation of range({in_features})")
        ptr, col = tensors.get("weight_outlier_ptr"), tensors.get("weight_outlier_col")
        if ptr is not None and col is not None:
            p = ptr.long()
            if int(p[0]) != 0 or int(p[-1]) != col.numel() or bool((p[1:] < p[:-1]).any()):
                raise FormatError(f"{where}.weight_outlier_ptr is not a CSR row pointer for {col.numel()} outliers "
                                  f"(must start at 0, never decrease, end at nnz)")
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= in_features):
                raise FormatError(f"{where}.weight_outlier_col has values in [{int(col.min())}, {int(col.max())}], "
                                  f"expected [0, {in_features})")
        for name in ("weight_scale_scale", "weight_scale_zero", "weight_outlier_val"):
            t = tensors.get(name)
            if t is not None and not torch.isfinite(t).all():
                raise FormatError(f"{where}.{name} contains non-finite values")

    def bits_per_weight(self, out_features: int, in_features: int, nnz: int = 0) -> float:
        """Stored bits per weight, everything counted (statistics, permutation, outliers)."""
        return stored_bits(self, out_features, in_features, {"nnz": nnz}) / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self)
