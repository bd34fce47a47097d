"""The bitstack spec: the fields config.json stores and the tensors a layer stores (the on-disk
contract is documented in ``hfcompress.formats.bitstack``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..registry import FormatError, TensorSpec, stored_bits

FORMAT_NAME = "bitstack"
FORMAT_VERSION = 1


def sign_words(in_features: int) -> int:
    return math.ceil(in_features / 32)


@dataclass(frozen=True)
class BitStackSpec:
    """Rank of each block's magnitude factorisation; the number of blocks a layer holds
    (``blocks``) is per layer, bound from the stored tensors."""

    format: ClassVar[str] = FORMAT_NAME
    overhead: ClassVar[str] = "low-rank factors, activation scale, block gains"

    rank: int = 16

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise FormatError(f"rank={self.rank!r} must be a positive int (16 is BitStack's default)")

    def check_layer(self, in_features: int, where: str | None = None) -> None:
        """Any shape can be stored."""

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Names (relative to the module), shapes and dtypes of every stored tensor but bias."""
        r = min(self.rank, out_features, in_features)
        return {
            "weight": TensorSpec(("blocks", out_features, sign_words(in_features)), torch.int32),  # sign planes
            "weight_u": TensorSpec(("blocks", out_features, r), torch.float16),
            "weight_v": TensorSpec(("blocks", r, in_features), torch.float16),
            "weight_in_scale": TensorSpec((in_features,), torch.float32),
            "weight_gain": TensorSpec(("blocks",), torch.float32),
        }

    @staticmethod
    def all_tensor_names() -> tuple[str, ...]:
        return ("weight", "weight_u", "weight_v", "weight_in_scale", "weight_gain")

    @staticmethod
    def default_sizes() -> dict[str, int]:
        return {"blocks": 0}

    def check_values(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                     where: str) -> None:
        s = tensors.get("weight_in_scale")
        if s is not None and not (torch.isfinite(s).all() and (s > 0).all()):
            raise FormatError(f"{where}.weight_in_scale must be finite and positive")
        for name in ("weight_u", "weight_v", "weight_gain"):
            t = tensors.get(name)
            if t is not None and not torch.isfinite(t).all():
                raise FormatError(f"{where}.{name} contains non-finite values")

    def block_bits(self, out_features: int, in_features: int) -> int:
        """Stored bits of one block (sign plane with its padding, u, v, its gain)."""
        one = stored_bits(self, out_features, in_features, {"blocks": 1})
        return one - stored_bits(self, out_features, in_features, {"blocks": 0})

    def bits_per_weight(self, out_features: int, in_features: int, blocks: int = 0) -> float:
        return stored_bits(self, out_features, in_features, {"blocks": blocks}) / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self)
