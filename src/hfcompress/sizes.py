"""Sizes as users write them ("70MB", "64MiB", "1.5GB", or bytes)."""

from __future__ import annotations

import re

from .config import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value, field: str = "target_size") -> int:
    """``"70MB"`` (10^6), ``"64MiB"`` (2^20), ``"1.5GB"``, or an int number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"quantization_config.{field}={value!r} is not a size; write e.g. '70MB', "
                              "'64MiB', '1.5GB' or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"quantization_config.{field}={value!r} must be positive")
    return n
