"""Storage formats: how compressed values are laid out, packed and turned back into floats.

A format knows nothing of the algorithm that chose its values (RTN, GPTQ, L4Q ... all emit
``int_group``).
"""

from .int_group import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_BITS,
    FormatError,
    IntGroupSpec,
    dequantize,
    pack_codes,
    unpack_codes,
    validate_tensors,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "FormatError",
    "IntGroupSpec",
    "dequantize",
    "pack_codes",
    "unpack_codes",
    "validate_tensors",
]
