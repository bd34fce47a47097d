"""Compressed layers: each format's layer class (its packed tensors as buffers, forward through
the format's op). ``CompressedLinear`` is their common base."""

from ..formats.layer import CompressedLinear
from .quant_linear import QuantLinear

__all__ = ["CompressedLinear", "QuantLinear"]
