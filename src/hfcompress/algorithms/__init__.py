"""Algorithms decide values; they emit codes/scales/zeros for a format. Pure torch."""

from .grid import fit_grid, quantize_to_codes
from .rtn import rtn

__all__ = ["fit_grid", "quantize_to_codes", "rtn"]
