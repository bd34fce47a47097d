"""The int_group op lives with its format (``hfcompress.formats.int_group.op``); these names stay
importable from here."""

from ..formats.int_group.op import _BACKENDS, BACKENDS, int_group_mm, int_group_mm_ref, register_backend

__all__ = ["BACKENDS", "_BACKENDS", "int_group_mm", "int_group_mm_ref", "register_backend"]
