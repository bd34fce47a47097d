"""Storage formats: how compressed values are laid out, packed and turned back into floats.

Each format is one folder (``formats/<name>/``: spec, stored tensors, pack/unpack, reference
dequantize/matmul, layer class, op) registered in :mod:`hfcompress.formats.registry`; everything
else asks the registry (:func:`get_format`, :func:`expected_tensors`, :func:`make_layer`,
:func:`is_compressed`). A format knows nothing of the algorithm that chose its values (RTN,
GPTQ, L4Q ... all emit ``int_group``).
"""

from .layer import CompressedLinear
from .registry import (
    Format,
    FormatError,
    TensorSpec,
    expected_tensors,
    formats,
    get_format,
    is_compressed,
    layer_classes,
    make_layer,
    register_format,
    stored_bits,
    validate_tensors,
)

# The registered formats (one line each).
from . import int_group  # noqa: E402
from . import spqr  # noqa: E402
from . import bitstack  # noqa: E402

from .int_group import (  # noqa: E402  (names kept importable from hfcompress.formats)
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_BITS,
    IntGroupSpec,
    dequantize,
    pack_codes,
    unpack_codes,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "CompressedLinear",
    "Format",
    "FormatError",
    "IntGroupSpec",
    "TensorSpec",
    "dequantize",
    "expected_tensors",
    "formats",
    "get_format",
    "is_compressed",
    "layer_classes",
    "make_layer",
    "pack_codes",
    "register_format",
    "stored_bits",
    "unpack_codes",
    "validate_tensors",
]
