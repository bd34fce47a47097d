"""KV-cache compression: GEAR (quantization + low-rank residual + sparse outliers) as a transformers Cache."""

from .cache import GEARCache, GEARLayer
from .gear import GEARSpec

__all__ = ["GEARCache", "GEARLayer", "GEARSpec"]
