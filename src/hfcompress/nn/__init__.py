"""Compressed layers: packed tensors as buffers, forward through hfcompress ops."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
