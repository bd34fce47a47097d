"""QuantLinear lives with its format (``hfcompress.formats.int_group.layer``); kept importable here."""

from ..formats.int_group.layer import QuantLinear
from ..formats.int_group.pack import pack

__all__ = ["QuantLinear", "pack"]
