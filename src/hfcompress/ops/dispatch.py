"""Per-device op backends (defined beside the formats, which own their ops)."""

from ..formats.dispatch import DeviceBackends

__all__ = ["DeviceBackends"]
